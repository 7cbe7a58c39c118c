#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then serves: by default the default model
# (SmolLM2-135M-Instruct) with one worker, OpenAI REST on http://127.0.0.1:8000/v1
# and the public gRPC API on 127.0.0.1:50051. Extra arguments go to `pagoda serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pagoda serve "$@"
