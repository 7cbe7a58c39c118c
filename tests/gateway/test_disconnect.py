"""A client that goes away, streaming or not, becomes an abort on the session at once."""

from __future__ import annotations

import time

import httpx
import pytest

from pagoda.text import Tokenizer
from tests.gateway.conftest import MODEL_NAME
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

# A request that runs for most of the 512-token context (seconds of the double's steps).
ENDLESS = {"model": MODEL_NAME, "max_tokens": 400, "ignore_eos": True}


def _request_id(double: SchedulerDouble, tokenizer: Tokenizer, prompt: str) -> str:
    submit = double.wait_for(lambda r: double.submit_with_prompt(tokenizer.encode(prompt)))
    return submit.request_id  # type: ignore[attr-defined]


def _wait_abort(double: SchedulerDouble, request_id: str) -> float:
    start = time.monotonic()
    double.wait_for(lambda r: request_id in r.aborts, timeout=3)
    return time.monotonic() - start


def test_a_streaming_client_that_leaves_aborts_its_request(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    prompt = "Streaming then gone"
    body = {**ENDLESS, "prompt": prompt, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        request_id = _request_id(double, tokenizer, prompt)
        assert request_id not in double.record.aborts
    assert _wait_abort(double, request_id) < 1.0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_waiting_client_that_leaves_aborts_its_request(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer, path: str
) -> None:
    prompt = f"Waiting then gone {path}"
    if path == "/v1/completions":
        body = {**ENDLESS, "prompt": prompt}
    else:
        body = {**ENDLESS, "messages": [{"role": "user", "content": prompt}]}
        prompt = tokenizer.apply_chat_template(body["messages"])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}{path}", json=body, timeout=0.5)
    special = path == "/v1/completions"
    ids = tokenizer.encode(prompt, add_special_tokens=special)
    submit = double.wait_for(lambda r: double.submit_with_prompt(ids))
    assert _wait_abort(double, submit.request_id) < 1.0  # type: ignore[attr-defined]
    running = httpx.get(f"{gateway.url}/metrics").text
    assert "pagoda_gateway_requests_in_flight 0.0" in running
