"""A client on the gateway's host: concurrent greedy streams through the ``openai`` client.

tests/e2e/test_multihost.py runs it inside the gateway's network namespace:

    python tests/e2e/multihost_client.py BASE_URL REQUESTS.json [--started N]

REQUESTS.json is a list of requests, each ``{"kind": "completion", "prompt": [token
ids], "max_tokens": N}`` or ``{"kind": "chat", "messages": [...], "max_tokens": N}``.
All of them stream at once, at temperature 0 with ``ignore_eos`` and logprobs on, so
that every streamed token comes with its own text (the logprobs' ``tokens``).

Prints JSON lines on stdout: ``{"event": "started", "index": i}`` once request ``i``
has streamed ``N`` tokens (default 2), then, once every stream has ended, one
``{"event": "result", "index": i, "text", "tokens", "finish_reason",
"completion_tokens", "longest_pause", "arrivals", "error"}`` per request in order, and
last ``{"event": "done"}``. ``arrivals`` lists ``[time.monotonic(), tokens]`` per chunk
that brought tokens (the clock is the machine's, shared by every network namespace).
Exits 0 whatever the streams did: the caller judges them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from typing import Any

import httpx
import openai

_print_lock = threading.Lock()


def emit(record: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


class Stream:
    """One streamed request, read on a thread of its own."""

    def __init__(self, index: int, spec: dict[str, Any], started_at: int) -> None:
        self.index = index
        self.spec = spec
        self.started_at = started_at
        self.text = ""
        self.tokens: list[str] = []
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.arrivals: list[tuple[float, int]] = []  # (time.monotonic(), tokens) per chunk
        self.error: str | None = None
        self._announced = False

    def run(self, client: openai.OpenAI, model: str) -> None:
        try:
            if self.spec["kind"] == "chat":
                self._chat(client, model)
            else:
                self._completion(client, model)
        except Exception as exc:  # every failure is reported, none raised
            self.error = f"{type(exc).__name__}: {exc}"

    def _common(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "max_tokens": self.spec["max_tokens"],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": {"ignore_eos": True},
        }

    def _completion(self, client: openai.OpenAI, model: str) -> None:
        stream = client.completions.create(
            prompt=self.spec["prompt"], logprobs=1, **self._common(model)
        )
        for chunk in stream:
            for choice in chunk.choices:
                self.text += choice.text
                if choice.logprobs is not None:
                    self._got(choice.logprobs.tokens or [])
                self.finish_reason = choice.finish_reason or self.finish_reason
            self._usage(chunk)

    def _chat(self, client: openai.OpenAI, model: str) -> None:
        stream = client.chat.completions.create(
            messages=self.spec["messages"], logprobs=True, **self._common(model)
        )
        for chunk in stream:
            for choice in chunk.choices:
                self.text += choice.delta.content or ""
                if choice.logprobs is not None:
                    self._got([entry.token for entry in choice.logprobs.content or []])
                self.finish_reason = choice.finish_reason or self.finish_reason
            self._usage(chunk)

    def _got(self, tokens: list[str]) -> None:
        if not tokens:
            return
        self.tokens.extend(tokens)
        self.arrivals.append((time.monotonic(), len(tokens)))
        if not self._announced and len(self.tokens) >= self.started_at:
            self._announced = True
            emit({"event": "started", "index": self.index})

    def _usage(self, chunk: Any) -> None:
        if getattr(chunk, "usage", None) is not None:
            self.completion_tokens = chunk.usage.completion_tokens

    def result(self) -> dict[str, Any]:
        times = [t for t, _ in self.arrivals]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return {
            "event": "result",
            "index": self.index,
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
            "longest_pause": max(gaps, default=0.0),
            "arrivals": self.arrivals,
            "error": self.error,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="the gateway, e.g. http://10.0.0.2:8000")
    parser.add_argument("requests", help="a JSON file: the list of requests")
    parser.add_argument("--started", type=int, default=2, help="tokens that make a stream started")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args()
    with open(args.requests) as f:
        specs = json.load(f)
    # The gateway is on this host's bridge: a proxy from the environment must not see it.
    client = openai.OpenAI(
        base_url=f"{args.base_url}/v1", api_key="unused", max_retries=0, timeout=args.timeout,
        http_client=httpx.Client(trust_env=False, timeout=args.timeout),
    )  # fmt: skip
    model = client.models.list().data[0].id
    streams = [Stream(i, spec, args.started) for i, spec in enumerate(specs)]
    threads = [threading.Thread(target=s.run, args=(client, model), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stream in streams:
        emit(stream.result())
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
