"""``worker_svc.runtime``: what a CPU worker preloads, and the re-execution that does it.

The choice is tested on folders made here; the re-execution with the libraries this
install has (the intel-openmp wheel is in the lock for Linux on x86-64, tcmalloc comes
from scripts/setup.sh): the new program has them mapped, torch computes right on them,
and a child of ``pagoda serve`` still ends with its parent across the exec.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker_svc import runtime
from worker_svc.runtime import CHOSEN, Choice, choose, reexec_env

REPO = Path(__file__).resolve().parents[2]
HERE = Path(sys.prefix) / "lib"
needs_iomp = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() == "x86_64"),
    reason="the intel-openmp wheel is locked for Linux on x86-64 only",
)


def _libs(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_both_libraries_are_preloaded_tcmalloc_first(tmp_path):
    first = _libs(tmp_path / "a", "libiomp5.so")
    second = _libs(tmp_path / "b", "libtcmalloc_minimal.so.4", "libiomp5.so")
    choice = choose("tuned", "cpu", {}, [first, second])
    assert choice.preload == (str(second / "libtcmalloc_minimal.so.4"), str(first / "libiomp5.so"))
    assert choice.reason == "both found"
    assert "libtcmalloc_minimal.so.4, libiomp5.so preloaded" in choice.describe()


def test_one_library_missing_is_named(tmp_path):
    choice = choose("tuned", "auto", {}, [_libs(tmp_path, "libiomp5.so")])
    assert choice.preload == (str(tmp_path / "libiomp5.so"),)
    assert choice.reason == "libtcmalloc_minimal.so.4 not found"


@pytest.mark.parametrize(
    ("mode", "device", "environ", "reason"),
    [
        ("plain", "cpu", {}, "--cpu-runtime plain, the default"),
        ("tuned", "cuda:0", {}, "a GPU worker"),
        ("tuned", "cpu", {"LD_PRELOAD": "/opt/mine.so"}, "LD_PRELOAD set by the environment"),
    ],
)
def test_nothing_is_preloaded(tmp_path, mode, device, environ, reason):
    dirs = [_libs(tmp_path, "libtcmalloc.so.4", "libiomp5.so")]
    assert choose(mode, device, environ, dirs) == Choice((), reason)


def test_nothing_found_changes_nothing(tmp_path):
    choice = choose("tuned", "cpu", {}, [tmp_path])
    assert choice.preload == ()
    assert "own allocator" in choice.describe()


def test_the_new_environment_names_the_choice():
    choice = Choice(("/x/libtcmalloc.so.4", "/y/libiomp5.so"), "both found")
    env = reexec_env(choice, {"PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/x/libtcmalloc.so.4:/y/libiomp5.so"
    assert env[CHOSEN] == choice.describe() and env["PATH"] == "/bin"


def test_settle_returns_what_was_chosen_before(monkeypatch):
    monkeypatch.setenv(CHOSEN, "chosen by the first start")
    assert runtime.settle("tuned", "cpu") == "chosen by the first start"


# Settles (re-executes once), then reports what the new program runs on and computes.
SETTLE = textwrap.dedent(
    """
    import os, torch
    from worker_svc.runtime import settle
    chosen = settle("tuned", "cpu")
    maps = open("/proc/self/maps").read()
    a = torch.randn(300, 200, dtype=torch.float64)
    ok = torch.allclose(a @ a.T, torch.einsum("ik,jk->ij", a, a))
    print(os.getpid(), "libiomp5.so" in maps, "libtcmalloc" in maps, ok, chosen, sep="|")
    """
)


@needs_iomp
def test_the_worker_restarts_on_intel_openmp_and_torch_computes_right():
    env = {k: v for k, v in os.environ.items() if k not in (CHOSEN, "LD_PRELOAD")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SETTLE], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=120)
    pid, iomp, tcmalloc, ok, chosen = out.strip().split("|")
    assert int(pid) == proc.pid  # the same process, re-executed
    assert iomp == "True" and ok == "True", out
    assert "libiomp5.so" in chosen
    assert tcmalloc == str((HERE / "libtcmalloc_minimal.so.4").exists())


# A child of pagoda serve: it watches its parent, then re-executes on the preload.
CHILD = textwrap.dedent(
    """
    import os, time
    from pagoda import lifeline
    from worker_svc.runtime import settle
    watching = lifeline.watch_parent()
    settle("tuned", "cpu")
    print(os.getpid(), watching, "libiomp5.so" in os.environ["LD_PRELOAD"], flush=True)
    time.sleep(600)
    """
)
PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pagoda.lifeline import Lifeline
    line = Lifeline()
    env = {k: v for k, v in line.child_env(None).items() if k != "LD_PRELOAD"}
    env.pop("PAGODA_CPU_RUNTIME_CHOSEN", None)
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env,
                             pass_fds=line.pass_fds, start_new_session=True)
    time.sleep(600)
    """
)


@needs_iomp
def test_a_child_of_pagoda_serve_still_ends_with_its_parent_after_the_restart():
    from tests.pagoda.test_lifeline import _kill_groups, _wait_gone

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid, watching, preloaded = parent.stdout.readline().split()
    assert watching == "True" and preloaded == "True"  # printed by the re-executed program
    parent.kill()
    parent.wait()
    left = _wait_gone([int(pid)])
    _kill_groups(left)
    assert not left, "outlived its parent after the restart"


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", [0]), ("0-3", [0, 1, 2, 3]), ("4, 0-1", [4, 0, 1])]
)
def test_cpu_lists_are_read_as_taskset_writes_them(text, cpus):
    assert runtime.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "0,0", "2-x", "3-1"])
def test_a_bad_cpu_list_is_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        runtime.threads_bind_spec(text)


@pytest.mark.parametrize(
    ("spec", "threads", "allowed", "cpus"),
    [
        ("auto", 2, [3, 1], [1, 3]),  # one thread per CPU of the mask, in order
        ("auto", 1, [0, 1], None),  # another worker computes on the other core
        ("nobind", 2, [0, 1], None),
        ("1,0", 2, [0, 1], [1, 0]),
    ],
)
def test_which_cpus_the_threads_are_bound_to(spec, threads, allowed, cpus):
    assert runtime.cpus_to_bind(spec, threads, allowed) == cpus


def test_a_cpu_outside_the_mask_is_refused():
    with pytest.raises(ValueError, match="may run only on"):
        runtime.cpus_to_bind("0-7", 8, [0, 1])


# Binds torch's threads in a fresh process, then reads each OpenMP thread's mask back.
BIND = textwrap.dedent(
    """
    import json, os, torch
    from worker_svc.runtime import bind_threads
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(len(cpus))
    said = bind_threads("auto", len(cpus))
    a = torch.randn(256, 256)
    ok = torch.allclose(a @ a, torch.einsum("ik,kj->ij", a, a), atol=1e-4)
    tasks = sorted(int(t) for t in os.listdir("/proc/self/task"))
    masks = [sorted(os.sched_getaffinity(t)) for t in tasks]
    print(said, ok, json.dumps(masks), sep="|")
    """
)


def test_binding_gives_each_compute_thread_one_cpu_and_torch_computes_right():
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-c", BIND], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    said, ok, masks = out.stdout.strip().split("|")
    cpus = sorted(os.sched_getaffinity(0))
    assert said == f"{len(cpus)} threads bound to CPUs {','.join(map(str, cpus))}"
    assert ok == "True"
    # The main thread and each OpenMP worker now run on one CPU each, all of them used.
    singles = [m[0] for m in json.loads(masks) if len(m) == 1]
    assert len(singles) >= len(cpus) and sorted(set(singles)) == cpus
