"""A burst beyond the queue bound: the excess is refused at once, the rest completes."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.e2e.stack import Gateway, Scheduler, Worker, slow_model
from tests.e2e.test_faults import wait_until_idle

# Four waiting sequences at most (two run at once): most of a burst of 20 is refused.
SCHEDULER_FLAGS = ["--max-model-len", "4096", "--max-num-seqs", "2",
                   "--max-num-batched-tokens", "2048", "--max-waiting-requests", "4"]  # fmt: skip


async def burst(base_url: str, count: int) -> list[tuple[int, float, dict]]:
    body = {"model": "slow-llama", "prompt": "Once upon a time", "max_tokens": 64,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        start = time.monotonic()

        async def one() -> tuple[int, float, dict]:
            response = await client.post("/v1/completions", json=body)
            return (
                response.status_code,
                time.monotonic() - start,
                response.json() | {"retry_after": response.headers.get("retry-after")},
            )

        return await asyncio.gather(*(one() for _ in range(count)))


def test_a_burst_past_the_queue_bound_gets_429_at_once(tmp_path):
    model = slow_model(tmp_path)
    scheduler = Scheduler(model, extra=SCHEDULER_FLAGS)
    worker = Worker(model, scheduler.step_addr, "worker-o", extra=["--kv-cache-memory", "128MiB"])
    gateway = Gateway(model, scheduler.grpc_addr)
    try:
        results = asyncio.run(burst(gateway.base_url, 20))
        refused = [r for r in results if r[0] == 429]
        served = [r for r in results if r[0] == 200]
        assert len(refused) + len(served) == 20, [r[0] for r in results]
        assert len(served) >= 4 and len(refused) >= 10  # at least the queue bound is served
        first_done = min(t for _, t, _ in served)
        # Refused before any admitted request completed, with an OpenAI-style body.
        assert max(t for _, t, _ in refused) < first_done
        for _, _, body in refused:
            assert body["error"]["message"] and body["retry_after"]
        assert all(b["usage"]["completion_tokens"] == 64 for _, _, b in served)
        wait_until_idle(scheduler, within=10)
    finally:
        for process in (gateway, worker, scheduler):
            process.stop()
