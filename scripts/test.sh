#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs every check: lint, formatting,
# import boundaries, then the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The checkers of deploy/ (hadolint, kubernetes-validate, checkov) in their own venv.
bash scripts/deploy_tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
# The kernels once more with triton 3.6, the release on the GPU machines.
bash scripts/triton_compat.sh
