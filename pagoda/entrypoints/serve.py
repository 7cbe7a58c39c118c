"""``pagoda serve``: the whole stack on one machine, as child processes on loopback.

It prepares the model card, starts the scheduler, N workers and the gateway (each
the same ``pagoda`` subcommand a pod would run, so one code path serves both),
waits until the gateway is listening and every worker has registered, prints the
URLs, and stays in the foreground. Ctrl-C or SIGTERM stops the gateway first, then
the workers, then the scheduler; a second signal kills what is left at once. Open
requests are ended at once (each stream gets a 503 error event), as ``vllm serve``
ends them by default; ``--drain-grace`` gives them that many seconds to finish first.
A child that dies on its own brings the rest down. Children start in a process group
of their own, and whatever outlives its bound is killed. If ``pagoda serve`` itself is
killed (SIGKILL included), every child kills its own group (``pagoda.lifeline``): no
orphans either way.

The children bind port 0 where a port is internal and report the real port on a
log line that this module reads from their stderr (which it forwards, prefixed).
A flag a child shares goes on to it through the declaration that parsed it
(``pagoda.flags.to_argv``): a new one is declared once and named in ``FORWARDED``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagoda.announcements import GATEWAY_LISTENING, SCHEDULER_LISTENING, WORKER_REGISTERED
from pagoda.flags import Flag, add_flags, to_argv
from pagoda.lifeline import Lifeline

# How long a child may take to exit beyond the drain grace it was given, before its
# group is killed (vllm serve gives its engine 5 s too): a worker finishes the step in
# hand first, and its interpreter's teardown with torch takes a second or two.
STOP_MARGIN_S = 5.0
START_TIMEOUT_S = 600.0

FLAGS = (
    Flag(
        "--model",
        help="a Hugging Face folder or a .gguf file (default: the default model, "
        "SmolLM2-135M-Instruct)",
    ),
    Flag("--workers", type=int, default=1, help="worker replicas to start"),
    Flag("--host", default="127.0.0.1", help="the gateway's host"),
    Flag("--port", type=int, default=8000, help="the gateway's HTTP port"),
    Flag("--grpc-port", type=int, default=50051, help="the public gRPC port"),
    Flag("--served-model-name", help="the model's name in the API"),
    Flag("--api-key", help="require this key from clients (default: $PAGODA_API_KEY, if set)"),
    Flag("--dtype", default="auto", help="weights and KV cache dtype"),
    Flag("--max-model-len", type=int, help="default: the model's"),
    Flag("--block-size", type=int, default=16, help="tokens per KV block"),
    Flag("--max-num-seqs", type=int, default=256, help="sequences running at once per replica"),
    Flag("--max-num-batched-tokens", type=int, help="default: the scheduler's"),
    Flag("--kv-cache-memory", help="per worker, e.g. 2GiB (default: 1GiB on CPU)"),
    Flag(
        "--attention-backend",
        default="auto",
        choices=["auto", "cpu", "torch", "triton"],
        help="the workers' kernels; auto: triton on CUDA, cpu (C++) on CPU",
    ),
    Flag("--seed", type=int, help="seed of the scheduler's request seeds"),
    Flag(
        "--drain-grace",
        type=float,
        default=0.0,
        env="PAGODA_DRAIN_GRACE",
        metavar="SECONDS",
        help="on SIGTERM, how long open requests may take to finish (0: end them at once, "
        "as vllm serve's --shutdown-timeout does by default)",
    ),
    Flag("--log-level", default="info", help="debug, info, warning or error"),
)

# The flags each child takes as they are, under the same name. Listed, not found by name
# alone: --host and --grpc-port are the gateway's, though the scheduler has flags so named;
# the rest of a child's command line (its model, addresses, name) is decided here.
FORWARDED = {
    "scheduler": ("--max-model-len", "--block-size", "--max-num-seqs",
                  "--max-num-batched-tokens", "--seed", "--drain-grace", "--log-level"),
    "worker": ("--dtype", "--max-model-len", "--block-size", "--kv-cache-memory",
               "--attention-backend", "--drain-grace", "--log-level"),
    "gateway": ("--host", "--port", "--grpc-port", "--served-model-name", "--drain-grace",
                "--log-level"),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, FLAGS)


def forwarded(child: str, args: argparse.Namespace) -> list[str]:
    """The part of ``child``'s command line that passes on what ``pagoda serve`` was given."""
    names = FORWARDED[child]
    return to_argv([f for f in FLAGS if f.name in names], args)


@dataclass
class Child:
    """One child process and what its log has told us."""

    name: str
    proc: subprocess.Popen
    found: dict[str, re.Match] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, key: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self.lock:
            while key not in self.found:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} did not report {key} in {timeout:.0f} s")
                self.lock.wait(min(left, 0.5))
            return self.found[key]


class Stack:
    """The children of one ``pagoda serve``."""

    def __init__(self, drain_grace_s: float = 0.0) -> None:
        self.children: list[Child] = []
        # Each group of children gets this long to exit after its SIGTERM.
        self.stop_bound_s = max(0.0, drain_grace_s) + STOP_MARGIN_S
        # Set by a second Ctrl-C or SIGTERM: stop waiting, kill what is left.
        self.hurry = threading.Event()
        # Each child watches it (pagoda.lifeline): if this process dies, even by
        # SIGKILL, every child kills its own process group.
        self.lifeline = Lifeline()

    def start(self, name: str, argv: list[str], patterns: dict[str, re.Pattern], env=None) -> Child:
        cmd = [sys.executable, "-m", "pagoda", *argv]
        proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env=self.lifeline.child_env(env), pass_fds=self.lifeline.pass_fds, text=True,
            bufsize=1, start_new_session=True,
        )  # fmt: skip
        child = Child(name, proc)
        self.children.append(child)
        threading.Thread(target=_forward, args=(child, patterns), daemon=True).start()
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        """Gateway first, then workers, then the scheduler: each drains what it holds
        (once the gateway is gone nothing is left to run, so the rest exit at once)."""
        order = sorted(self.children, key=lambda c: _STOP_ORDER.get(c.name.split("-")[0], 9))
        for group in _groups(order):
            running = [c for c in group if c.proc.poll() is None]
            if running:
                names = ", ".join(c.name for c in running)
                print(f"pagoda serve: stopping {names}", file=sys.stderr, flush=True)
            for child in running:
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_bound_s
            for child in group:
                if not self._wait(child, deadline):
                    _kill_group(child.proc)
        for child in self.children:  # anything a child started and left behind
            _kill_group(child.proc)
        self.lifeline.close()

    def _wait(self, child: Child, deadline: float) -> bool:
        """Until ``child`` exits (True), or the deadline or a hurry comes (False)."""
        while not self.hurry.is_set():
            try:
                child.proc.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                return True
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return False
        return child.proc.poll() is not None


_STOP_ORDER = {"gateway": 0, "worker": 1, "scheduler": 2}


def _groups(children: list[Child]) -> list[list[Child]]:
    groups: dict[int, list[Child]] = {}
    for child in children:
        groups.setdefault(_STOP_ORDER.get(child.name.split("-")[0], 9), []).append(child)
    return [groups[k] for k in sorted(groups)]


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _forward(child: Child, patterns: dict[str, re.Pattern]) -> None:
    """Copy a child's stderr to ours, prefixed, noting the lines we wait for."""
    assert child.proc.stderr is not None
    for line in child.proc.stderr:
        sys.stderr.write(f"[{child.name}] {line}")
        for key, pattern in patterns.items():
            match = pattern.search(line)
            if match:
                with child.lock:
                    child.found.setdefault(key, match)
                    child.lock.notify_all()
    with child.lock:
        child.lock.notify_all()


def prepare_card(model: str | None) -> tuple[Path, Path]:
    """(weights, card): the model a worker loads and the card folder the others read."""
    from pagoda.default_model import default_model_path
    from pagoda.model_card.writer import ensure_model_card

    weights = Path(model) if model else default_model_path()
    if not weights.exists():
        raise FileNotFoundError(f"model {str(weights)!r} not found")
    return weights, ensure_model_card(weights).path


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("pagoda serve: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        weights, card = prepare_card(args.model)
    except (OSError, ValueError, ImportError) as exc:
        print(f"pagoda serve: error: {exc}", file=sys.stderr)
        return 1
    stack = Stack(args.drain_grace)
    stopping = threading.Event()

    def on_signal(*_: object) -> None:
        if stopping.is_set():  # a second signal: stop waiting for anyone
            stack.hurry.set()
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in _SIGNALS}
    try:
        _start_all(stack, args, weights, card)
        print(_banner(args), flush=True)
        while not stopping.wait(0.5):
            dead = stack.first_exited()
            if dead is not None:
                print(
                    f"pagoda serve: {dead.name} exited with code {dead.proc.returncode}; stopping",
                    file=sys.stderr,
                )
                return 1
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"pagoda serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stopping.set()  # from here on, a signal means: hurry
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _start_all(stack: Stack, args: argparse.Namespace, weights: Path, card: Path) -> None:
    env = dict(os.environ)
    # Loopback only, but a secret costs nothing and keeps strays from registering.
    env["PAGODA_SHARED_SECRET"] = env.get("PAGODA_SHARED_SECRET") or secrets.token_hex(16)
    env["PAGODA_LOCAL_WORKERS"] = str(args.workers)
    sched_argv = ["scheduler", "--model", str(card), "--grpc-port", "0", "--step-port", "0",
                  "--http-port", "0", *forwarded("scheduler", args)]  # fmt: skip
    scheduler = stack.start(
        "scheduler", sched_argv, {"listening": SCHEDULER_LISTENING.pattern}, env
    )
    grpc_addr, step_addr, _ = scheduler.wait_for("listening", START_TIMEOUT_S).groups()
    workers = []
    for i in range(args.workers):
        argv = ["worker", "--scheduler", step_addr, "--model", str(weights),
                "--worker-id", f"worker-{i}", "--http-port", "0",
                *forwarded("worker", args)]  # fmt: skip
        workers.append(
            stack.start(f"worker-{i}", argv, {"registered": WORKER_REGISTERED.pattern}, env)
        )
    # The gateway's /ready waits for every worker: a request sent once it says ready
    # never waits for a worker that is still loading.
    gw_argv = ["gateway", "--model", str(card), "--scheduler", grpc_addr,
               "--min-ready-replicas", str(args.workers),
               *forwarded("gateway", args)]  # fmt: skip
    gateway_env = dict(env)
    gateway_env.pop("PAGODA_SHARED_SECRET")  # the gateway has no use for it
    if args.api_key:  # by environment, so it shows in no process listing
        gateway_env["PAGODA_API_KEY"] = args.api_key
    gateway = stack.start("gateway", gw_argv, {"listening": GATEWAY_LISTENING.pattern}, gateway_env)
    args.http_url, args.grpc_url = gateway.wait_for("listening", START_TIMEOUT_S).groups()
    for worker in workers:
        worker.wait_for("registered", START_TIMEOUT_S)


def _banner(args: argparse.Namespace) -> str:
    return (
        f"pagoda is serving with {args.workers} worker(s)\n"
        f"  OpenAI REST: http://{args.http_url}/v1\n"
        f"  gRPC:        {args.grpc_url}\n"
        f"  metrics:     http://{args.http_url}/metrics\n"
        "Ctrl-C stops everything."
    )
