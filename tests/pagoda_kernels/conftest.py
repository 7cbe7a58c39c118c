"""Fixtures of the kernel tests: each CPU-extension variant this CPU runs (`ops`)."""

from __future__ import annotations

import pytest

from pagoda_kernels import cpu_build

VARIANTS = [isa.name for isa in cpu_build.runnable_isas()]


@pytest.fixture(scope="module", params=VARIANTS)
def ops(request):
    try:
        return cpu_build.load(request.param)
    except cpu_build.BuildError as e:
        pytest.fail(f"the CPU extension should build here: {e}")
