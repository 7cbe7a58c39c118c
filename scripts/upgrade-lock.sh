#!/usr/bin/env bash
# Moves the locks to the newest releases that pyproject.toml's ranges and the inputs in
# requirements/ allow (or, given package names, only those packages), installs them
# into .venv, and runs the whole suite on them. Commit the locks once it passes:
#
#   bash scripts/upgrade-lock.sh                    # everything
#   bash scripts/upgrade-lock.sh transformers kernels
#
# torch stays where requirements/pins.in holds it (the CPU wheel on this kind of
# machine); move it there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    upgrade=(--upgrade)
else
    upgrade=()
    for package in "$@"; do upgrade+=(--upgrade-package "$package"); done
fi
bash scripts/lock.sh "${upgrade[@]}"
git diff --stat -- requirements/ || true
# Installs what the locks now hold, then lint, boundaries and every test.
bash scripts/test.sh
