"""What the stack does when clients, gateways or the scheduler go away.

The services run one by one (``pagoda scheduler``, ``pagoda worker``, ``pagoda
gateway``) on the tiny random Llama, so a test can kill exactly one of them.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.e2e.stack import Gateway, Scheduler, Worker, free_port, slow_model

LONG = 2000  # tokens: many seconds of decoding for the batch below
SCHEDULER_FLAGS = ["--max-model-len", "4096", "--seed", "0"]
WORKER_FLAGS = ["--kv-cache-memory", "128MiB"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("e2e-faults"))


@pytest.fixture(scope="module")
def services(model):
    scheduler = Scheduler(model, extra=SCHEDULER_FLAGS)
    worker = Worker(model, scheduler.step_addr, "worker-a", extra=WORKER_FLAGS)
    gateways = [Gateway(model, scheduler.grpc_addr), Gateway(model, scheduler.grpc_addr)]
    yield scheduler, worker, gateways
    for process in (*gateways, worker, scheduler):
        process.stop()


def wait_until_idle(scheduler: Scheduler, within: float):
    """Stats once nothing runs, waits or holds a KV block; fails after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        stats = scheduler.stats()
        live = [r for r in stats.replicas if r.state == r.ACTIVE]
        idle = stats.num_running == 0 and stats.num_waiting == 0
        if idle and all(r.kv_usage == 0 for r in live):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {within} s: {stats}")
        time.sleep(0.2)


def body(stream: bool) -> dict:
    return {"model": "slow-llama", "prompt": "Once upon a time", "max_tokens": LONG,
            "temperature": 0, "ignore_eos": True, "stream": stream}  # fmt: skip


async def dropped_clients(base_url: str, streams: int, plain: int) -> None:
    """Start requests that would run for many seconds, then walk away from all of them."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def streaming() -> None:
            async with client.stream("POST", "/v1/completions", json=body(True)) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    break  # one event, then gone

        async def non_streaming() -> None:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json=body(False), timeout=2.0)

        await asyncio.gather(
            *(streaming() for _ in range(streams)), *(non_streaming() for _ in range(plain))
        )


def test_clients_that_leave_are_aborted_and_free_their_blocks(services):
    scheduler, _, gateways = services
    gateways[0].wait_for("gateway listening")
    model_name = httpx.get(f"{gateways[0].base_url}/v1/models").json()["data"][0]["id"]
    assert model_name
    start = time.monotonic()
    asyncio.run(dropped_clients(gateways[0].base_url, streams=50, plain=10))
    wait_until_idle(scheduler, within=10)
    # 60 requests x 2,000 tokens take far longer than this on two cores.
    assert time.monotonic() - start < 20
    ok = httpx.post(f"{gateways[0].base_url}/v1/completions", json=body(False) | {"max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_a_killed_gateway_loses_its_requests_and_not_the_others(model, services):
    scheduler, _worker, _ = services
    doomed = Gateway(model, scheduler.grpc_addr)

    async def start_streams() -> list:
        client = httpx.AsyncClient(base_url=doomed.base_url, timeout=30)
        started = []
        for _ in range(5):
            request = client.build_request("POST", "/v1/completions", json=body(True))
            response = await client.send(request, stream=True)
            assert response.status_code == 200
            started.append(response)
        return started

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(start_streams())
        assert scheduler.stats().num_running + scheduler.stats().num_waiting >= 5
        doomed.stop(signal.SIGKILL)
        wait_until_idle(scheduler, within=10)
    finally:
        loop.close()
        doomed.kill()
    survivor = Gateway(model, scheduler.grpc_addr)
    try:
        ok = httpx.post(
            f"{survivor.base_url}/v1/completions", json=body(False) | {"max_tokens": 4}, timeout=30
        )
        assert ok.status_code == 200
    finally:
        survivor.stop()


def test_without_a_scheduler_the_gateway_answers_503_and_recovers(model):
    port = free_port()
    scheduler = Scheduler(model, grpc_port=port, extra=SCHEDULER_FLAGS)
    worker = Worker(model, scheduler.step_addr, "worker-r", extra=WORKER_FLAGS)
    gateway = Gateway(model, scheduler.grpc_addr)
    try:
        short = body(False) | {"max_tokens": 4}
        assert httpx.post(f"{gateway.base_url}/v1/completions", json=short).status_code == 200
        scheduler.kill()
        worker.stop(signal.SIGKILL)
        start = time.monotonic()
        answer = httpx.post(f"{gateway.base_url}/v1/completions", json=short, timeout=30)
        assert answer.status_code == 503 and time.monotonic() - start < 5
        assert "error" in answer.json()
        assert _eventually(lambda: httpx.get(f"{gateway.base_url}/ready").status_code == 503)
        assert httpx.get(f"{gateway.base_url}/health").status_code == 200

        scheduler = Scheduler(model, grpc_port=port, extra=SCHEDULER_FLAGS)
        worker = Worker(model, scheduler.step_addr, "worker-r2", extra=WORKER_FLAGS)
        assert _eventually(lambda: httpx.get(f"{gateway.base_url}/ready").status_code == 200)
        again = httpx.post(f"{gateway.base_url}/v1/completions", json=short, timeout=30)
        assert again.status_code == 200, again.text
    finally:
        for process in (gateway, worker, scheduler):
            process.kill()


def _eventually(check, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False
