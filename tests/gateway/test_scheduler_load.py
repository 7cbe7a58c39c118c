"""The scheduler's load on the session: a real gateway process, and the scheduler double
sending ``SchedulerLoad`` down its real gRPC stream.

The gateway shows the scheduler's figures under vLLM's names (what an endpoint picker
such as the Gateway API Inference Extension scrapes), its own requests in flight under
a pagoda name, and with ``--min-ready-replicas`` its /ready (and gRPC health) waits for
that many live replicas.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.model_card.card import ModelCard
from tests.gateway.harness import REPO, GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def eventually(check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError("the gateway never got there")
        time.sleep(0.02)
    return value


def metric(gateway: GatewayProcess, name: str) -> float | None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def ready(gateway: GatewayProcess) -> tuple[int, str]:
    answer = httpx.get(f"{gateway.url}/ready", timeout=5)
    return answer.status_code, answer.text


def grpc_health(gateway: GatewayProcess) -> int:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.fixture
def waiting_gateway(card: ModelCard, double: SchedulerDouble) -> Iterator[GatewayProcess]:
    process = GatewayProcess.start(Path(card.path), double.address, "--min-ready-replicas", "2")
    yield process
    assert process.stop() == 0, process.log()


def test_the_schedulers_load_shows_under_vllm_names(
    gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    model = 'model_name="tiny-chat"'
    waiting, running, kv = (
        f"vllm:num_requests_waiting{{{model}}}",
        f"vllm:num_requests_running{{{model}}}",
        f"vllm:kv_cache_usage_perc{{{model}}}",
    )
    assert (metric(gateway, waiting), metric(gateway, running), metric(gateway, kv)) == (0, 0, 0)
    double.send_load(num_waiting=3, num_running=5, kv_cache_usage=0.25, num_live_replicas=2)
    eventually(lambda: metric(gateway, waiting) == 3)
    assert (metric(gateway, running), metric(gateway, kv)) == (5, 0.25)
    assert metric(gateway, "pagoda_gateway_scheduler_live_replicas") == 2
    # The gateway's own requests in flight have a name of their own; none is open.
    assert metric(gateway, "pagoda_gateway_requests_in_flight") == 0
    double.send_load(num_waiting=0, num_running=1, kv_cache_usage=0.5, num_live_replicas=2)
    eventually(lambda: metric(gateway, kv) == 0.5)
    assert (metric(gateway, waiting), metric(gateway, running)) == (0, 1)
    # A default gateway (--min-ready-replicas 0) is ready whatever the replica count.
    double.send_load(num_live_replicas=0)
    eventually(lambda: metric(gateway, "pagoda_gateway_scheduler_live_replicas") == 0)
    assert ready(gateway) == (200, "ready\n")


def test_ready_waits_for_the_live_replicas_it_was_told_to(
    waiting_gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    gateway = waiting_gateway
    eventually(lambda: metric(gateway, "pagoda_gateway_session_up") == 1)
    assert ready(gateway) == (503, "not ready: 0 of 2 worker replicas are live\n")
    assert grpc_health(gateway) == NOT_SERVING
    double.send_load(num_live_replicas=1)
    eventually(lambda: metric(gateway, "pagoda_gateway_scheduler_live_replicas") == 1)
    assert ready(gateway) == (503, "not ready: 1 of 2 worker replicas are live\n")
    double.send_load(num_live_replicas=2)
    gateway.wait_ready()
    assert ready(gateway) == (200, "ready\n")
    assert eventually(lambda: grpc_health(gateway) == SERVING)
    double.send_load(num_live_replicas=1)
    gateway.wait_ready(False)
    assert eventually(lambda: grpc_health(gateway) == NOT_SERVING)


def test_a_lost_session_shows_zeros_and_a_negative_count_is_refused(
    card: ModelCard, scripts: list[list[int]]
) -> None:
    double = SchedulerDouble(card.to_proto(), scripts).start()
    gateway = GatewayProcess.start(Path(card.path), double.address)
    try:
        gateway.wait_ready()
        double.send_load(num_waiting=4, kv_cache_usage=0.75, num_live_replicas=1)
        eventually(lambda: metric(gateway, 'vllm:num_requests_waiting{model_name="tiny-chat"}'))
        double.stop()
        eventually(lambda: metric(gateway, "pagoda_gateway_session_up") == 0)
        assert metric(gateway, 'vllm:num_requests_waiting{model_name="tiny-chat"}') == 0
        assert metric(gateway, 'vllm:kv_cache_usage_perc{model_name="tiny-chat"}') == 0
        assert metric(gateway, "pagoda_gateway_scheduler_live_replicas") == 0
    finally:
        gateway.stop()
        double.close()
    command = [sys.executable, "-m", "gateway", "--model", str(card.path),
               "--min-ready-replicas", "-1"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert run.returncode == 2 and "--min-ready-replicas must be 0 or more" in run.stderr
