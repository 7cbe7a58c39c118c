"""A worker stopped with SIGTERM under load, with real processes: no client sees it.

One scheduler, two workers and one gateway (``pagoda scheduler``, ``pagoda worker``,
``pagoda gateway``) serve a Llama large enough that a batch of streams runs for
seconds on two cores. While 16 greedy streams run, the worker that holds some of
them gets SIGTERM: it takes nothing new (streams started after the signal run on the
other worker), finishes what it runs, is released by the scheduler and exits 0 well
within its grace period; every stream completes, full length, without an error.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from pagoda.v1 import session_pb2
from tests.e2e.stack import Gateway, Scheduler, Worker, slow_model

STREAMS = 16
LATE = 4
MAX_TOKENS = 256
GRACE_S = 60
SCHEDULER_FLAGS = ["--max-model-len", "1024", "--seed", "0"]
WORKER_FLAGS = ["--kv-cache-memory", "128MiB", "--threads", "1"]
DRAINING = session_pb2.ReplicaStats.DRAINING


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("e2e-drain"))


def body(i: int) -> dict:
    return {"model": "slow-llama", "prompt": f"Story number {i}: once upon a time",
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip


async def stream(client: httpx.AsyncClient, i: int) -> dict:
    """One streamed completion: its finish reason, usage, and any error event."""
    out: dict = {"status": None, "finish": None, "usage": None, "errors": [], "done": False}
    async with client.stream("POST", "/v1/completions", json=body(i)) as response:
        out["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
                break
            event = json.loads(data)
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            for choice in event.get("choices", []):
                out["finish"] = choice.get("finish_reason") or out["finish"]
            out["usage"] = event.get("usage") or out["usage"]
    return out


def replica_of(worker: Worker) -> int:
    return int(worker.wait_for(r"registered replica=(\d+)").group(1))


def stop_the_busier_worker(scheduler: Scheduler, workers: dict[int, Worker]) -> tuple[int, float]:
    """Once every stream runs, SIGTERM the worker that runs the most of them; returns its
    replica and when it was signalled."""
    deadline = time.monotonic() + 60
    while True:
        stats = scheduler.stats()
        running = {r.replica_id: r.num_running for r in stats.replicas if r.replica_id in workers}
        if sum(running.values()) == STREAMS:
            break
        assert time.monotonic() < deadline, f"the streams never all ran: {stats}"
        time.sleep(0.02)
    rid = max(running, key=running.__getitem__)
    assert running[rid] >= STREAMS // 2
    workers[rid].proc.send_signal(signal.SIGTERM)
    return rid, time.monotonic()


def watch_the_drain(scheduler: Scheduler, rid: int, worker: Worker) -> tuple[list[int], int]:
    """What the draining replica runs, sampled until its worker exits; and its exit code."""
    running = []
    while worker.proc.poll() is None:
        mine = {r.replica_id: r for r in scheduler.stats().replicas}.get(rid)
        if mine is not None and mine.state == DRAINING:
            running.append(mine.num_running)
        time.sleep(0.02)
    return running, worker.proc.wait()


def test_sigterm_on_a_busy_worker_loses_no_stream_and_it_exits_0_within_its_grace(model):
    scheduler = Scheduler(model, extra=SCHEDULER_FLAGS)
    processes: list = [scheduler]
    try:
        flags = WORKER_FLAGS + ["--drain-grace", str(GRACE_S)]
        workers = {}
        for name in ("worker-a", "worker-b"):
            worker = Worker(model, scheduler.step_addr, name, extra=flags)
            processes.append(worker)
            workers[replica_of(worker)] = worker
        gateway = Gateway(model, scheduler.grpc_addr)
        processes.append(gateway)

        async def load() -> tuple[list[dict], int, float, list[int], int]:
            limits = httpx.Limits(max_connections=STREAMS + LATE)
            async with httpx.AsyncClient(
                base_url=gateway.base_url, timeout=120, limits=limits
            ) as client:
                first = [asyncio.create_task(stream(client, i)) for i in range(STREAMS)]
                rid, signalled = await asyncio.to_thread(stop_the_busier_worker, scheduler, workers)
                watch = asyncio.create_task(
                    asyncio.to_thread(watch_the_drain, scheduler, rid, workers[rid])
                )
                await asyncio.sleep(0.5)  # the drain has begun: these go to the other worker
                late = [asyncio.create_task(stream(client, STREAMS + i)) for i in range(LATE)]
                results = await asyncio.gather(*first, *late)
                running, code = await watch
                return results, rid, signalled, running, code

        results, rid, signalled, running, code = asyncio.run(load())
        leaving = workers[rid]
        assert code == 0, leaving.log
        assert time.monotonic() - signalled < GRACE_S
        leaving.wait_for(rf"{leaving.name} drained \(released by the scheduler: drained\)")
        assert running and running[0] >= 1, "Stats showed it DRAINING with its streams"
        assert running == sorted(running, reverse=True), f"it took new work: {running}"
        for i, result in enumerate(results):
            assert result["status"] == 200 and not result["errors"], (i, result)
            assert result["done"] and result["finish"] == "length", (i, result)
            assert result["usage"]["completion_tokens"] == MAX_TOKENS, (i, result)
        stats = scheduler.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        live = [r.replica_id for r in stats.replicas if r.state == r.ACTIVE]
        (other,) = set(workers) - {rid}
        assert live == [other] and workers[other].proc.poll() is None
    finally:
        for process in reversed(processes):
            process.kill()
