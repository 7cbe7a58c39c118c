#!/usr/bin/env bash
# The Triton kernels' tests again with triton 3.6, the release the GPU machines carry
# (the project's environment has a newer one): interpreter tests and the
# ahead-of-time compilation for sm80/sm90. triton 3.6 goes into a folder of its own
# that shadows the environment's triton through PYTHONPATH. Its interpreter reads
# scalars in a way numpy 2.4 refuses, so numpy < 2.4 comes with it.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/triton-3.6
if [ ! -f "$target/triton/__init__.py" ]; then
    .venv/bin/uv --quiet pip install --python .venv/bin/python --no-deps --target "$target" \
        'triton==3.6.0' 'numpy==2.3.5'
fi
PYTHONPATH="$PWD/$target" TRITON_INTERPRET=1 .venv/bin/python -c \
    'import triton; assert triton.__version__.startswith("3.6"), triton.__version__'
PYTHONPATH="$PWD/$target" TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/pagoda_kernels/test_triton_attention.py \
    tests/pagoda_kernels/test_triton_cache.py tests/pagoda_kernels/test_triton_pointwise.py
