"""``pagoda serve`` killed while it serves: its children die with it.

A real ``pagoda serve`` (``python -m pagoda serve``) on the tiny Llama runs streams;
then it is killed with SIGKILL, at once or while its graceful stop (SIGTERM) is under
way, as a supervisor that runs out of patience does. No process of its tree may be
left within a generous bound, and the ports its children held must refuse
connections: every child watches the parent through ``pagoda.lifeline``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Serve, pagoda_processes, tiny_model

STREAMS = 8
GONE_WITHIN_S = 20.0  # a bound for a loaded 2-core machine, not a measurement


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("e2e-lifecycle"))


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (by parent links in /proc), with its command."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            )
        except OSError:
            continue
        # The command name (in parentheses) may hold spaces: the fields follow the last ')'.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    """Those of ``pids`` still running the same command (not zombies, not reused)."""
    left = {}
    for pid, command in pids.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state != "Z" and now == command:
            left[pid] = command
    return left


def refuses(address: str) -> bool:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except OSError:
        return True


def start_streams(serve: Serve, started: threading.Barrier) -> list[threading.Thread]:
    """Streams that run far longer than the test: each waits for its first token."""

    def run(i: int) -> None:
        body = {"prompt": f"Stream {i} goes on", "max_tokens": 400, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        try:
            with httpx.stream("POST", f"{serve.base_url}/v1/completions", json=body,
                              timeout=httpx.Timeout(60, connect=10)) as response:  # fmt: skip
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                started.wait()
                for _ in lines:
                    pass
        except (httpx.HTTPError, StopIteration):
            pass  # the server goes away under it: that is the point
        finally:
            if not started.broken:
                started.abort()  # a stream that never started must not hang the test

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("how", ["sigkill", "sigterm-then-sigkill"])
def test_killing_pagoda_serve_takes_its_whole_tree_down(model, how):
    serve = Serve(model, extra=["--dtype", "float32", "--max-model-len", "512",
                                "--kv-cache-memory", "64MiB"])  # fmt: skip
    worker_http = serve.wait_for(r"\[worker-0\].*http=(\S+)").group(1)
    ports = [serve.base_url, serve.grpc_addr, serve.scheduler_http, worker_http]
    started = threading.Barrier(STREAMS + 1)
    threads = start_streams(serve, started)
    started.wait(timeout=120)  # every stream has its first token
    tree = descendants(serve.proc.pid)
    assert len(tree) >= 3, tree  # the scheduler, the worker and the gateway at least
    if how == "sigterm-then-sigkill":
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_for(r"\[gateway\].*draining", timeout=30)  # the graceful stop is under way
    os.kill(serve.proc.pid, signal.SIGKILL)
    serve.proc.wait()

    def left() -> list:
        # A zombie leader may still have threads closing its sockets: poll the ports too.
        held = [address for address in ports if not refuses(address)]
        return [*alive(tree).values(), *pagoda_processes(str(model)), *held]

    deadline = time.monotonic() + GONE_WITHIN_S
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not left(), f"outlived pagoda serve: {left()}"
    finally:
        for pid in alive(tree):  # a failed test leaves nothing running either
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
