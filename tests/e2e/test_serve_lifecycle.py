"""``pagoda serve`` stopped or killed while it serves: its children end with it.

A real ``pagoda serve`` (``python -m pagoda serve``) on the tiny Llama runs streams.
Killed with SIGKILL, at once or while its graceful stop (SIGTERM) is under way, as a
supervisor that runs out of patience does, it leaves no process of its tree within a
generous bound, and the ports its children held refuse connections: every child
watches the parent through ``pagoda.lifeline``. Stopped with SIGTERM, it exits 0, and
every open stream ends with a word: a retryable 503 event at once by default (as
``vllm serve`` aborts), or its whole answer with ``--drain-grace``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway import errors
from tests.e2e.stack import Serve, pagoda_processes, tiny_model

STREAMS = 8
GONE_WITHIN_S = 20.0  # a bound for a loaded 2-core machine, not a measurement
DRAINING = errors.draining().message


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


class Streams:
    """Streams running on ``serve``, each recording how it ended: ``done`` ([DONE] seen),
    the message of an error event, or ``cut`` (the connection closed first)."""

    def __init__(self, serve: Serve, count: int = STREAMS) -> None:
        self.started = threading.Barrier(count + 1)
        self.endings: dict[int, str] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(serve.base_url, i), daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()
        self.started.wait(timeout=120)  # every stream has its first token

    def _run(self, url: str, i: int) -> None:
        body = {"prompt": f"Stream {i} goes on", "max_tokens": 400, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        ending, first = "cut", True
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body,
                              timeout=httpx.Timeout(60, connect=10)) as response:  # fmt: skip
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first:
                        first = False
                        self.started.wait()
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        ending = "done"
                    elif '"error"' in data:
                        ending = json.loads(data)["error"]["message"]
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass  # the server went away under it
        finally:
            self.endings[i] = ending
            if first:
                self.started.abort()  # a stream that never started must not hang the test

    def join(self) -> dict[int, str]:
        for thread in self.threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        return self.endings


def serve_tiny(model: Path, *extra: str) -> Serve:
    return Serve(model, extra=["--dtype", "float32", "--max-model-len", "512",
                               "--kv-cache-memory", "64MiB", *extra])  # fmt: skip


@pytest.mark.parametrize("how", ["sigkill", "sigterm-then-sigkill"])
def test_killing_pagoda_serve_takes_its_whole_tree_down(model, how):
    # With a long drain grace, the SIGTERM case is killed in the middle of its graceful stop.
    serve = serve_tiny(model, "--drain-grace", "60")
    worker_http = serve.wait_for(r"\[worker-0\].*http=(\S+)").group(1)
    ports = [serve.base_url, serve.grpc_addr, serve.scheduler_http, worker_http]
    streams = Streams(serve)
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
    streams.join()


@pytest.mark.parametrize("grace", [None, "60"], ids=["default", "drain-grace"])
def test_sigterm_under_load_ends_every_stream_with_a_word_and_exits_0(model, grace):
    """By default open streams end at once with a retryable 503 event, as vllm serve
    aborts them; with --drain-grace they run to their end first. Either way: exit 0."""
    serve = serve_tiny(model, *(["--drain-grace", grace] if grace else []))
    streams = Streams(serve)
    tree = descendants(serve.proc.pid)
    assert serve.stop(signal.SIGTERM) == 0, serve.log
    endings = streams.join()
    if grace is None:
        assert set(endings.values()) <= {"done", DRAINING}, endings
        assert DRAINING in endings.values(), endings
    else:
        assert set(endings.values()) == {"done"}, endings
    assert not alive(tree) and not pagoda_processes(str(model))
