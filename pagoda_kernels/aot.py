"""Compile every Triton kernel variant ahead of time for real GPU targets.

    python -m pagoda_kernels.aot [MODULE ...]

No GPU is needed: Triton lowers each variant down to a cubin for every
architecture in ``AOT_ARCHS``, which fails on what the interpreter accepts but a
GPU compiler rejects. Runs in a process of its own because interpreter mode
(``TRITON_INTERPRET=1``) replaces every ``@triton.jit`` function with one that
cannot be compiled; this module refuses to run in that mode.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from pagoda_kernels.triton_support import AOT_ARCHS, INTERPRET, AotVariant

MODULES = (
    "pagoda_kernels.triton_attention",
    "pagoda_kernels.triton_cache",
    "pagoda_kernels.triton_pointwise",
)


def variants_of(module_name: str) -> list[AotVariant]:
    return list(importlib.import_module(module_name).aot_variants())


def compile_one(job: tuple[str, int, int]) -> str | None:
    """Compile variant ``index`` of a module for ``arch``; the failure, if any, as a line."""
    module_name, index, arch = job
    variant = variants_of(module_name)[index]
    try:
        variant.compile(arch)
    except Exception as exc:  # every compile error is a finding to report
        first = " | ".join(str(exc).strip().splitlines()[:3])
        return f"{variant.name} sm{arch}: {type(exc).__name__}: {first}"
    return None


def compile_all(module_names: list[str], processes: int | None = None) -> tuple[int, list[str]]:
    """Compile every variant for every arch, on every core; (count, failures)."""
    jobs = [
        (name, index, arch)
        for name in module_names
        for index in range(len(variants_of(name)))
        for arch in AOT_ARCHS
    ]
    processes = processes or os.cpu_count() or 1
    with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
        results = list(pool.map(compile_one, jobs))
    return len(jobs), [r for r in results if r is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES))
    args = parser.parse_args(argv)
    if INTERPRET:
        print("pagoda_kernels.aot: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    start = time.perf_counter()
    count, failures = compile_all(args.modules)
    for line in failures:
        print("FAILED", line)
    took = time.perf_counter() - start
    print(f"compiled {count - len(failures)}/{count} variants in {took:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
