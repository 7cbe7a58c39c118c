"""The C runtime a CPU worker runs on (its own, or tcmalloc and Intel's OpenMP), and its threads.

vLLM's CPU backend is documented and measured with tcmalloc and Intel's OpenMP
(``libiomp5``, which also answers GNU OpenMP's calls) preloaded: every step makes and
drops hundreds of tensors and hands each op to the thread pool. pagoda's CPU step does
little of either (its kernels are few and large), and on the tiny Llama benchmark the
preload measured within the noise, each library alone and both (docs/benchmarks.md).
So it is there behind ``--cpu-runtime tuned``, not the default: it changes the worker's
memory profile for no measured gain.

A library can only be preloaded when a process starts, so a tuned worker that finds
them re-executes itself once with ``LD_PRELOAD`` naming them, before torch is imported.
The new process sees ``PAGODA_CPU_RUNTIME_CHOSEN`` and does not do it again; it logs
what was chosen. Nothing is preloaded on a GPU worker or where the operator already set
``LD_PRELOAD``.

The other lever vLLM's CPU worker pulls is binding each compute thread to one core
(``--cpu-threads-bind``). It too measured within the noise on 2 cores (2-4% slower in
two runs side by side), so threads are left to the kernel unless asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pagoda import lifeline

CHOSEN = "PAGODA_CPU_RUNTIME_CHOSEN"
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
IOMP = ("libiomp5.so",)
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


@dataclass(frozen=True)
class Choice:
    """What the worker runs on, and why; ``preload`` is empty when nothing is added."""

    preload: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        if not self.preload:
            return f"the process's own allocator and OpenMP ({self.reason})"
        return f"{', '.join(Path(p).name for p in self.preload)} preloaded ({self.reason})"


def search_dirs() -> list[Path]:
    """Where the libraries are looked for: the environment's own lib folder first.

    The ``intel-openmp`` wheel puts ``libiomp5.so`` into ``<prefix>/lib``;
    scripts/setup.sh puts Debian's tcmalloc there too; the images install it system-wide.
    """
    return [Path(sys.prefix) / "lib", *map(Path, SYSTEM_DIRS)]


def find_library(names: Sequence[str], dirs: Sequence[Path]) -> Path | None:
    for folder in dirs:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def on_gpu(device: str) -> bool:
    """Whether the worker will run on a GPU; ``auto`` picks one when a driver is there."""
    if device == "auto":
        return Path("/dev/nvidiactl").exists()
    return device != "cpu"


def choose(mode: str, device: str, environ: Mapping[str, str], dirs: Sequence[Path]) -> Choice:
    """The runtime for a worker started with ``--cpu-runtime mode`` on ``device``."""
    if mode == "plain":
        return Choice((), "--cpu-runtime plain, the default")
    if on_gpu(device):
        return Choice((), "a GPU worker")
    if environ.get("LD_PRELOAD"):
        return Choice((), "LD_PRELOAD set by the environment")
    found = [find_library(names, dirs) for names in (TCMALLOC, IOMP)]
    preload = tuple(str(path) for path in found if path is not None)
    if not preload:
        return Choice((), "neither tcmalloc nor libiomp5 found")
    missing = [
        names[0] for names, path in zip((TCMALLOC, IOMP), found, strict=True) if path is None
    ]
    return Choice(preload, f"{missing[0]} not found" if missing else "both found")


def reexec_env(choice: Choice, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the re-executed process."""
    env = dict(environ, **{CHOSEN: choice.describe()})
    env["LD_PRELOAD"] = ":".join(choice.preload)
    return env


def settle(mode: str, device: str) -> str:
    """Re-execute this process on the chosen runtime, or return what it runs on.

    Returns only in the process that goes on: the first start either re-executes
    (and never returns) or finds nothing to add.
    """
    if CHOSEN in os.environ:
        return os.environ[CHOSEN]
    choice = choose(mode, device, os.environ, search_dirs())
    if not choice.preload:
        return choice.describe()
    # sys.orig_argv is the command line as given, ``-m pagoda`` included.
    env = lifeline.across_exec(reexec_env(choice, os.environ))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,6"`` as ``[0, 1, 2, 3, 6]``: the form of ``taskset -c`` and of cpusets."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        last = last if dash else first
        if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise ValueError(f"not a CPU list: {text!r} (e.g. 0-3,6)")
        cpus.extend(range(int(first), int(last) + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"a CPU appears twice in {text!r}")
    return cpus


def threads_bind_spec(text: str) -> str:
    """``--cpu-threads-bind``'s argparse type: a bad CPU list is a usage error."""
    if text not in ("auto", "nobind"):
        try:
            parse_cpu_list(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def cpus_to_bind(spec: str, threads: int, allowed: Sequence[int]) -> list[int] | None:
    """The CPUs thread i is bound to under ``--cpu-threads-bind spec``; None: no binding.

    ``auto`` binds only a worker that computes on every CPU it may run on: workers that
    share a machine's cores (``PAGODA_LOCAL_WORKERS``) or run under a CPU quota would
    otherwise pile their threads onto the same first cores.
    """
    if spec == "nobind":
        return None
    if spec == "auto":
        return sorted(allowed) if threads == len(allowed) else None
    cpus = parse_cpu_list(spec)
    if not set(cpus) <= set(allowed):
        raise ValueError(f"--cpu-threads-bind {spec}: this process may run only on {allowed}")
    return cpus


def bind_threads(spec: str, threads: int) -> str:
    """Bind torch's OpenMP threads as ``spec`` says (after torch.set_num_threads).

    Returns what was done, for the log. Binding runs in the CPU extension (a thread can
    only be bound by itself, inside the OpenMP team); without it nothing is bound.
    """
    allowed = sorted(os.sched_getaffinity(0))
    cpus = cpus_to_bind(spec, threads, allowed)
    if cpus is None:
        return f"threads not bound ({spec}, {threads} of {len(allowed)} CPUs)"
    from pagoda_kernels import cpu_build

    try:
        ops = cpu_build.load(cpu_build.chosen_isa().name)
    except cpu_build.BuildError as e:
        return f"threads not bound: no CPU extension ({e})"
    got = ops.bind_threads(cpus)
    return f"{len(got)} threads bound to CPUs {','.join(map(str, got))}"
