#!/usr/bin/env bash
# Resolves the locks from their inputs with uv (installed by scripts/setup.sh):
#   requirements/lock.txt          pyproject.toml (every extra) + requirements/pins.in
#   requirements/deploy-tools.txt  requirements/deploy-tools.in
# Versions already in a lock stay where they are unless they no longer fit, so after a
# change in pyproject.toml this moves only what it must. Extra arguments go to
# `uv pip compile`: --upgrade moves everything to the newest releases,
# --upgrade-package NAME one package (scripts/upgrade-lock.sh does that and tests).
#
# The lock is universal (markers where a version depends on the platform or Python),
# with one version of each package wherever one fits every Python from 3.11 (the CPU
# image and this machine) to 3.12 (the CUDA image); as constraints it installs only
# what the install asks for: a CPU install takes none of the CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || bash scripts/setup.sh
compile() {
    .venv/bin/uv pip compile --quiet --universal --python-version 3.11 --fork-strategy fewest \
        --custom-compile-command 'bash scripts/lock.sh' "$@"
}
compile pyproject.toml requirements/pins.in --all-extras -o requirements/lock.txt "$@"
compile requirements/deploy-tools.in -o requirements/deploy-tools.txt "$@"
