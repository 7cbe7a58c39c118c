"""Online serving benchmark against any OpenAI-compatible server (pagoda, ``vllm serve``).

Requests arrive as a Poisson process at ``--rate`` per second (``inf``: all at once),
each a streamed ``/v1/completions`` call with a prompt of ``--input-len`` random
words (or ``--prompt`` verbatim) generating exactly ``--output-len`` tokens
(``ignore_eos``). Prints one JSON line:

- ``ttft_ms``: time to the first streamed token; ``tpot_ms``: (end - first token)
  over the further tokens, per request; ``itl_ms``: gaps between streamed chunks;
  each as p50 / p99 (and mean);
- ``output_tok_s``: all generated tokens over the benchmark's wall time;
  ``request_s``: completed requests per second.

    .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8000 --rate 4 --num-requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = [
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem",
    "hand", "part", "place", "case", "week", "company", "system", "program",
]  # fmt: skip


@dataclass
class Result:
    ok: bool
    start: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def prompt_of(args: argparse.Namespace, rng: random.Random) -> str:
    if args.prompt:
        return args.prompt
    return " ".join(rng.choice(WORDS) for _ in range(args.input_len))


async def one_request(client: httpx.AsyncClient, args, prompt: str) -> Result:
    body = {
        "model": args.model, "prompt": prompt, "max_tokens": args.output_len,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    result = Result(ok=False, start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event.get("choices") and event["choices"][0].get("text"):
                    result.first = result.first or now
                    result.chunks.append(now)
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
        result.end = time.perf_counter()
        result.ok = result.first is not None
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        if not args.model:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        tasks = []
        start = time.perf_counter()
        for _ in range(args.num_requests):
            tasks.append(asyncio.create_task(one_request(client, args, prompt_of(args, rng))))
            if args.rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return summarize(results, wall, args)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "p50": round(pct(0.5) * 1e3, 2),
        "p99": round(pct(0.99) * 1e3, 2),
        "mean": round(statistics.fmean(ordered) * 1e3, 2),
    }


def summarize(results: list[Result], wall: float, args) -> dict:
    done = [r for r in results if r.ok]
    ttft = [r.first - r.start for r in done]
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in done if r.tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    tokens = sum(r.tokens for r in done)
    return {
        "base_url": args.base_url, "model": args.model, "rate": args.rate,
        "num_requests": args.num_requests, "completed": len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "input_words": None if args.prompt else args.input_len, "output_len": args.output_len,
        "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 1),
        "request_s": round(len(done) / wall, 2),
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="default: the first of /v1/models")
    p.add_argument("--api-key")
    p.add_argument("--rate", type=float, default=float("inf"), help="requests per second")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="random words per prompt")
    p.add_argument("--prompt", help="use this prompt for every request instead")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
