"""A stalled engine: while the scheduler's gRPC health says NOT_SERVING, new requests
get 503 at once, but the gateway stays ready (an unready gateway would get no traffic
to explain the stall to), and requests already running are left alone."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import api_pb2, api_pb2_grpc
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

BODY = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 100}


def _until(check: object, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the gateway never noticed"
        time.sleep(0.02)


def test_new_requests_get_503_while_the_engine_is_stalled_and_the_gateway_stays_ready(
    gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    url = gateway.url
    running = {**BODY, "prompt": "Already running", "max_tokens": 150, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**running, "stream": True}) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
        double.set_serving(False)
        try:
            _until(lambda: httpx.post(f"{url}/v1/completions", json=BODY).status_code == 503)
            start = time.monotonic()
            refused = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
            assert refused.status_code == 503 and time.monotonic() - start < 0.5
            error = refused.json()["error"]
            assert error["type"] == "service_unavailable" and "stalled" in error["message"]
            assert refused.headers["retry-after"] == "5"
            assert httpx.get(f"{url}/ready").status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            assert "pagoda_gateway_scheduler_not_serving 1.0" in metrics
            with grpc.insecure_channel(gateway.grpc_target) as channel:
                stub = api_pb2_grpc.GenerationStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Complete(api_pb2.GenerateRequest(text="Hi"), timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                health = health_pb2_grpc.HealthStub(channel)
                answer = health.Check(health_pb2.HealthCheckRequest(service=""))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            double.set_serving(True)
        # The stream that was running when the stall began went on to its end.
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    _until(lambda: httpx.post(f"{url}/v1/completions", json=BODY).status_code == 200)
    assert (
        httpx.post(f"{url}/v1/completions", json=BODY).json()["choices"][0]["text"] == (REPLIES[0])
    )
    assert "pagoda_gateway_scheduler_not_serving 0.0" in httpx.get(f"{url}/metrics").text


def test_a_stall_reported_before_the_session_opens_is_noticed(
    gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    """The watch starts with each session, so a gateway that reconnects to a scheduler
    that is already stalled learns it too."""
    double.stop()
    gateway.wait_ready(False)
    double.set_serving(False)
    try:
        double.start()
        gateway.wait_ready()
        _until(lambda: httpx.post(f"{gateway.url}/v1/completions", json=BODY).status_code == 503)
    finally:
        double.set_serving(True)
    _until(lambda: httpx.post(f"{gateway.url}/v1/completions", json=BODY).status_code == 200)
