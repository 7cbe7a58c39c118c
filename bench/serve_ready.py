"""From ``pagoda serve`` to the first token: when each part of the stack is up.

Starts ``pagoda serve`` (the default model, or ``--model`` with fp32 and a small
context), polls the gateway's ``/ready`` from the moment it listens, sends one
streamed completion as soon as ``/ready`` says 200, and prints, in seconds from the
start, the log lines that mark the steps (gateway listening, session open, worker
probes up, warm-up, Hello, registration, banner) with ``/ready`` and the first token
among them.

    .venv/bin/python bench/serve_ready.py [--model PATH]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time

import httpx

from pagoda.announcements import GATEWAY_LISTENING

# The asctime, level and logger of a child's log line, dropped when printed.
LOG_PREFIX = re.compile(r"^(\[\S+\]) \S+ \S+ \S+ \S+: ")
MARKS = ("listening", "open to scheduler", "http=", "warm", "sent hello", "joined", "serving with")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face folder (default: the default model)")
    args = parser.parse_args()
    argv = [sys.executable, "-m", "pagoda", "serve", "--port", "0", "--grpc-port", "0"]
    if args.model:
        argv += ["--model", args.model, "--dtype", "float32", "--max-model-len", "256",
                 "--kv-cache-memory", "64MiB"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events: list[tuple[float, str]] = []
    found: dict[str, str] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append((time.monotonic() - start, line.rstrip()))
            if match := GATEWAY_LISTENING.pattern.search(line):
                found["http"] = match.group(1)

    threading.Thread(target=read, daemon=True).start()
    try:
        while "http" not in found:
            time.sleep(0.01)
        url = f"http://{found['http']}"
        while httpx.get(f"{url}/ready", trust_env=False).status_code != 200:
            time.sleep(0.02)
        ready = time.monotonic()
        events.append((ready - start, "### /ready 200"))
        body = {"prompt": "Hello there", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, trust_env=False,
                          timeout=600) as answer:  # fmt: skip
            next(line for line in answer.iter_lines() if line.startswith("data:"))
        first = time.monotonic()
        events.append((first - start, "### first token"))
    finally:
        proc.terminate()
        proc.wait(120)
    for at, line in sorted(events):
        if line.startswith("###") or any(mark in line for mark in MARKS):
            shown = LOG_PREFIX.sub(r"\1 ", line)
            print(f"{at:8.2f}  {shown[:140]}")
    print(f"first token {first - ready:.2f} s after /ready said 200")


if __name__ == "__main__":
    main()
