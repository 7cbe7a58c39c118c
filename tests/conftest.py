"""Test-wide settings.

Property tests draw the same examples on every run (``derandomize``), so a run's result
depends on the code alone; ``pytest --hypothesis-profile=explore`` draws new ones, to
look for counterexamples the fixed draws miss.

Triton's interpreter must be chosen before anything imports triton (torch imports it
lazily), so it is set here, first: without a GPU every Triton kernel runs under the
interpreter on CPU tensors; with one, the kernels compile and run on it.
"""

import os
import shutil

os.environ.setdefault("TRITON_INTERPRET", "0" if shutil.which("nvidia-smi") else "1")

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")
