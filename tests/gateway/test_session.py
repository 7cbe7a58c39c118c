"""The session to the scheduler: losing it, getting it back, refusing a wrong one, and
draining on SIGTERM."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagoda.model_card.card import ModelCard
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

ENDLESS = {"model": MODEL_NAME, "prompt": "Go on", "max_tokens": 400, "ignore_eos": True}


def _complete(gateway: GatewayProcess, **body: object) -> httpx.Response:
    payload = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 100, **body}
    return httpx.post(f"{gateway.url}/v1/completions", json=payload, timeout=10)


def test_scheduler_gone_means_503_at_once_and_back_means_served(
    gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    assert _complete(gateway).json()["choices"][0]["text"] == REPLIES[0]
    outcome: dict[str, object] = {}

    def wait_long() -> None:
        outcome["response"] = httpx.post(f"{gateway.url}/v1/completions", json=ENDLESS, timeout=10)

    waiter = threading.Thread(target=wait_long)
    waiter.start()
    with httpx.stream(
        "POST", f"{gateway.url}/v1/completions", json={**ENDLESS, "stream": True}, timeout=10
    ) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        double.wait_for(lambda r: len(r.submits) >= 3)
        double.stop()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    waiter.join(5)
    # The stream ends with an error event; the waiting request gets a retryable 503.
    assert json.loads(rest[-1])["error"]["code"] == "service_unavailable"
    assert "[DONE]" not in rest
    response = outcome["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 503
    # New requests get 503 at once, and the gateway says it is not ready.
    start = time.monotonic()
    refused = _complete(gateway)
    assert refused.status_code == 503 and time.monotonic() - start < 1.0
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert refused.headers["retry-after"]
    assert httpx.get(f"{gateway.url}/ready").status_code == 503
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    assert "pagoda_gateway_session_up 0.0" in httpx.get(f"{gateway.url}/metrics").text
    double.start()
    gateway.wait_ready(timeout=5)
    assert _complete(gateway).json()["choices"][0]["text"] == REPLIES[0]
    assert len(double.record.opens) == 2


def test_sigterm_refuses_new_requests_finishes_open_streams_and_exits_0(
    card: ModelCard, double: SchedulerDouble
) -> None:
    process = GatewayProcess.start(Path(card.path), double.address)
    process.wait_ready()
    body = {"model": MODEL_NAME, "prompt": "Drain me", "max_tokens": 120, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{process.url}/v1/completions", json={**body, "stream": True}, timeout=10
    ) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        process.proc.terminate()
        process.wait_ready(False, timeout=2)
        assert _complete(process).status_code == 503
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert process.proc.wait(10) == 0
    assert "draining" in process.log()


@pytest.mark.parametrize("version", [99])
def test_a_scheduler_of_another_protocol_version_is_refused(
    card: ModelCard, scripts: list[list[int]], version: int
) -> None:
    other = SchedulerDouble(card.to_proto(), scripts, protocol_version=version).start()
    process = GatewayProcess.start(Path(card.path), other.address)
    try:
        other.wait_for(lambda r: r.opens)
        time.sleep(0.2)
        assert httpx.get(f"{process.url}/ready").status_code == 503
        assert _complete(process).status_code == 503
        assert "protocol" in process.log()
    finally:
        assert process.stop() == 0
        other.close()
