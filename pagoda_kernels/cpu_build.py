"""Builds and loads pagoda's CPU kernels: a C++ extension compiled once per instruction set.

The sources in ``csrc/cpu`` are compiled with g++ against the installed torch into one
shared library per instruction set (``ISAS``), each registering its operators in a
namespace of its own (``torch.ops.pagoda_cpu_avx512`` ...). An image may run on another
CPU than the one that built it, so nothing is compiled for the build machine
(``-march=native``): the variant is picked at run time from the CPU's flags, or by
``PAGODA_CPU_ISA``.

Libraries are cached under ``PAGODA_CPU_EXT_DIR`` (default ``~/.cache/pagoda/cpu-ext``)
by a key over the sources, the torch version, the compiler and its flags, so a changed
source or a new torch builds again and nothing stale is ever loaded. ``scripts/setup.sh``
and the worker image build every variant ahead of time::

    python -m pagoda_kernels.cpu_build            # every variant, in parallel
    python -m pagoda_kernels.cpu_build avx2       # one

A worker that finds its variant missing builds it on first use (a log line says so).
No build happens at install time: an isolated build environment would pull a torch of
its own.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("pagoda.kernels")

SOURCES = Path(__file__).with_name("csrc") / "cpu"
COMPILER = os.environ.get("CXX", "g++")
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")


@dataclass(frozen=True)
class Isa:
    """One instruction set the kernels are compiled for."""

    name: str
    cpu_flags: frozenset[str]  # what /proc/cpuinfo must list for this variant to run
    compile_flags: tuple[str, ...]

    @property
    def namespace(self) -> str:
        return f"pagoda_cpu_{self.name}"


_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c")
# Best first: the first one the CPU can run is the default.
ISAS = (
    Isa(
        "avx512_bf16",
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"}),
        (*_AVX512, "-mavx512bf16", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
    ),
    Isa(
        "avx512",
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}),
        (*_AVX512, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
    ),
    Isa(
        "avx2",
        frozenset({"avx2", "fma", "f16c"}),
        ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    ),
)
ISA_NAMES = tuple(isa.name for isa in ISAS)


class BuildError(RuntimeError):
    """The extension could not be compiled here (no compiler, or it failed)."""


def isa(name: str) -> Isa:
    for candidate in ISAS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown CPU instruction set {name!r}; known: {', '.join(ISA_NAMES)}")


@cache
def cpu_flags() -> frozenset[str]:
    """The flags of this CPU as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable_isas() -> list[Isa]:
    """The variants this CPU can run, best first."""
    flags = cpu_flags()
    return [candidate for candidate in ISAS if candidate.cpu_flags <= flags]


def chosen_isa() -> Isa:
    """``PAGODA_CPU_ISA`` if set (it must run here), else the best variant this CPU runs."""
    runnable = runnable_isas()
    wanted = os.environ.get("PAGODA_CPU_ISA")
    if wanted:
        choice = isa(wanted)
        if choice not in runnable:
            raise ValueError(
                f"PAGODA_CPU_ISA={wanted}: this CPU lacks "
                f"{', '.join(sorted(choice.cpu_flags - cpu_flags()))}"
            )
        return choice
    if not runnable:
        raise BuildError("this CPU has neither AVX-512 nor AVX2 with FMA")
    return runnable[0]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "pagoda" / "cpu-ext"
    return Path(os.environ.get("PAGODA_CPU_EXT_DIR", default)).expanduser()


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def _command(variant: Isa, output: Path) -> list[str]:
    torch_dir = _torch_dir()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        COMPILER, *BASE_FLAGS, *variant.compile_flags,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DPAGODA_OPS_NS={variant.namespace}",
        "-I", str(torch_dir / "include"),
        str(SOURCES / "ops.cpp"), "-o", str(output),
        "-L", str(torch_dir / "lib"), "-lc10", "-ltorch_cpu",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip


@cache
def _compiler_version() -> str:
    try:
        out = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"no C++ compiler ({COMPILER}): {e}") from None
    return out.stdout.splitlines()[0]


def build_key(variant: Isa) -> str:
    """What the library depends on: sources, torch, the compiler and the flags."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(_compiler_version().encode())
    digest.update(" ".join(_command(variant, Path("out"))).encode())
    return digest.hexdigest()[:16]


def library_path(variant: Isa) -> Path:
    return cache_dir() / f"{variant.namespace}-{build_key(variant)}.so"


def build(variant: Isa) -> Path:
    """The variant's library, compiled first if the cache lacks it.

    A lock file keeps two processes (workers starting side by side) from compiling the
    same library at once; the library appears under its name only once complete.
    """
    path = library_path(variant)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        log.info(
            "the %s CPU kernels are not built yet; compiling them now (about a minute; "
            "`python -m pagoda_kernels.cpu_build` does it ahead of time)", variant.name,
        )  # fmt: skip
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        start = time.monotonic()
        done = subprocess.run(_command(variant, partial), capture_output=True, text=True)
        if done.returncode:
            partial.unlink(missing_ok=True)
            raise BuildError(f"compiling the {variant.name} kernels failed:\n{done.stderr[-4000:]}")
        partial.rename(path)
        log.info(
            "built the %s CPU kernels in %.0f s: %s", variant.name, time.monotonic() - start, path
        )
    return path


@cache
def load(name: str) -> object:
    """``torch.ops.<namespace>`` of variant ``name``, built first if needed."""
    variant = isa(name)
    torch.ops.load_library(str(build(variant)))
    from pagoda_kernels import cpu_ops  # the fake kernels, for torch.compile

    cpu_ops.register_fakes(variant.namespace)
    return getattr(torch.ops, variant.namespace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("isas", nargs="*", help=f"any of {', '.join(ISA_NAMES)} (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        variants = [isa(n) for n in args.isas] if args.isas else list(ISAS)
    except ValueError as e:
        parser.error(str(e))
    if shutil.which(COMPILER) is None:
        print(f"no C++ compiler ({COMPILER}): the CPU kernels fall back to torch", file=sys.stderr)
        return 1
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        paths = list(pool.map(build, variants))
    for path in paths:
        print(path)
    print(f"CPU kernels ready in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
