"""How long ``pagoda serve`` takes to stop on SIGTERM while streams run.

Starts ``python -m pagoda serve`` (its children on free ports), opens ``--streams``
concurrent SSE completions that would run far longer than the measurement
(``ignore_eos``, ``--max-tokens``), waits until every stream has its first token, sends
SIGTERM and times the exit. Prints the lines the stack logged after the signal, with
their times (to see which child took the time), then one JSON line: ``stop_s`` (SIGTERM
to exit); the gaps between a stream's chunks before the signal (``itl_p50_ms``,
``itl_max_ms``: a worker finishes the step in hand before it stops); how the streams
ended (``done``: ``[DONE]`` seen; ``error``: an error event; ``cut``: the connection
closed first); and the exit code.

    .venv/bin/python bench/shutdown.py --model PATH --streams 100 -- --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class Stack:
    """``pagoda serve`` with its merged output timestamped as it arrives."""

    def __init__(self, model: str | None, extra: list[str]) -> None:
        argv = [sys.executable, "-m", "pagoda", "serve", "--port", "0", "--grpc-port", "0"]
        argv += ["--model", model] if model else []
        self.proc = subprocess.Popen(
            [*argv, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))
            found = re.search(r"OpenAI REST: (http://\S+)/v1", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not self.url:
            tail = "\n".join(line for _, line in self.lines[-30:])
            raise SystemExit(f"pagoda serve did not start:\n{tail}")


async def one_stream(client: httpx.AsyncClient, i: int, args, first: asyncio.Event, out: dict):
    body = {"prompt": f"Stream {i}: once upon a time", "max_tokens": args.max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    got_first = False
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                if last is not None and not out["signalled"]:
                    out["gaps"].append(now - last)
                last = now
                if not got_first:
                    got_first = True
                    out["started"] += 1
                    if out["started"] == args.streams:
                        first.set()
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out["done"] += 1
                    return
                if '"error"' in data:
                    out["error"] += 1
                    return
    except httpx.HTTPError:
        pass
    out["cut"] += 1


async def measure(args: argparse.Namespace, stack: Stack) -> dict:
    out = {"started": 0, "done": 0, "error": 0, "cut": 0, "gaps": [], "signalled": False}
    first = asyncio.Event()
    limits = httpx.Limits(max_connections=args.streams + 8)
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=timeout) as client:
        tasks = [asyncio.create_task(one_stream(client, i, args, first, out))
                 for i in range(args.streams)]  # fmt: skip
        await asyncio.wait_for(first.wait(), args.start_timeout)
        await asyncio.sleep(args.settle)
        sent = time.monotonic()
        out["signalled"] = True
        stack.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(stack.proc.wait, args.stop_timeout)
        stop_s = time.monotonic() - sent
        await asyncio.wait(tasks, timeout=30)
    for at, line in stack.lines:
        if at >= sent:
            print(f"+{at - sent:7.3f}s {line}", file=sys.stderr)
    gaps = sorted(out["gaps"]) or [0.0]
    return {"streams": args.streams, "max_tokens": args.max_tokens, "stop_s": round(stop_s, 3),
            "itl_p50_ms": round(1000 * gaps[len(gaps) // 2], 1),
            "itl_max_ms": round(1000 * gaps[-1], 1),
            "exit_code": code, **{k: out[k] for k in ("done", "error", "cut")}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: pagoda serve's default model")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of streaming first")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--stop-timeout", type=float, default=300)
    parser.add_argument("extra", nargs="*", help="more pagoda serve flags (after --)")
    args = parser.parse_args()
    stack = Stack(args.model, args.extra)
    try:
        stack.wait_ready(args.start_timeout)
        print(json.dumps(asyncio.run(measure(args, stack))))
    finally:
        if stack.proc.poll() is None:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
