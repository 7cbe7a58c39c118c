"""Per-request deadlines and priorities, from the client to ``Submit``.

A deadline comes from the REST body's ``timeout``, the gRPC call's own deadline, or the
gateway's ``--request-timeout``; it travels as ``Submit.deadline_unix_ms``, and the
gateway enforces it by itself: past it the request is aborted at the scheduler (the
double records the abort) and answered 504 / DEADLINE_EXCEEDED, or, for a stream
already under way, an error event that ends the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from pagoda.model_card.card import ModelCard
from pagoda.text import Tokenizer
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2, session_pb2
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

# Most of the 512-token context (seconds of the double's steps): only a deadline or an
# abort ends it sooner.
ENDLESS = {"model": MODEL_NAME, "max_tokens": 400, "ignore_eos": True}
TIMEOUT_S = 0.6


def _submit_of(double: SchedulerDouble, tokenizer: Tokenizer, prompt: str) -> session_pb2.Submit:
    found = double.wait_for(lambda r: double.submit_with_prompt(tokenizer.encode(prompt)))
    assert isinstance(found, session_pb2.Submit)
    return found


def _assert_deadline_error(body: dict[str, object]) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
    assert str(TIMEOUT_S) in error["message"]


def test_a_rest_timeout_is_sent_enforced_and_answered_504(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    prompt = "Deadline, whole"
    start_ms = time.time() * 1000
    start = time.monotonic()
    answer = httpx.post(
        f"{gateway.url}/v1/completions",
        json={**ENDLESS, "prompt": prompt, "timeout": TIMEOUT_S},
        timeout=10,
    )
    took = time.monotonic() - start
    assert answer.status_code == 504, answer.text
    assert TIMEOUT_S <= took < TIMEOUT_S + 1.0
    _assert_deadline_error(answer.json())
    submit = _submit_of(double, tokenizer, prompt)
    assert start_ms + TIMEOUT_S * 1000 - 50 <= submit.deadline_unix_ms
    assert submit.deadline_unix_ms <= start_ms + TIMEOUT_S * 1000 + 500
    # The abort reached the scheduler, so its blocks are freed there.
    double.wait_for(lambda r: submit.request_id in r.aborts, timeout=2)
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "pagoda_gateway_requests_timed_out_total 1.0" in metrics
    assert 'pagoda_gateway_requests_total{api="rest",status="504"}' in metrics


def test_a_stream_past_its_deadline_ends_with_an_error_event(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    prompt = "Deadline, streamed"
    body = {**ENDLESS, "prompt": prompt, "stream": True, "timeout": TIMEOUT_S}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=10) as stream:
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert len(events) > 5 and json.loads(events[0])["choices"]  # tokens came first
    _assert_deadline_error(json.loads(events[-1]))
    submit = _submit_of(double, tokenizer, prompt)
    double.wait_for(lambda r: submit.request_id in r.aborts, timeout=2)


def test_the_openai_client_sends_a_timeout_through_extra_body(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(
            model=MODEL_NAME,
            prompt="Deadline via extra_body",
            max_tokens=400,
            extra_body={"ignore_eos": True, "timeout": TIMEOUT_S},
        )
    assert caught.value.status_code == 504
    # A request that finishes in time is not affected by its deadline.
    done = client.completions.create(
        model=MODEL_NAME, prompt="Hi", max_tokens=100, extra_body={"timeout": 30}
    )
    assert done.choices[0].text == REPLIES[0]


def test_a_grpc_deadline_travels_and_ends_the_call(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    prompt = "Deadline over gRPC"
    request = api_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
    )
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        start_ms = time.time() * 1000
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stub.Generate(request, timeout=TIMEOUT_S):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        submit = _submit_of(double, tokenizer, prompt)
        assert 0 < submit.deadline_unix_ms - start_ms <= TIMEOUT_S * 1000 + 200
        double.wait_for(lambda r: submit.request_id in r.aborts, timeout=2)
        # Without a deadline of its own a call has none (this gateway sets no default).
        plain = stub.Complete(api_pb2.GenerateRequest(text="No deadline here"))
        assert plain.choices[0].text == REPLIES[0]
        assert _submit_of(double, tokenizer, "No deadline here").deadline_unix_ms == 0


@pytest.fixture(scope="module")
def strict_gateway(card: ModelCard, double: SchedulerDouble) -> Iterator[GatewayProcess]:
    """A gateway whose requests get TIMEOUT_S unless they name a deadline of their own."""
    process = GatewayProcess.start(
        Path(card.path), double.address, "--request-timeout", str(TIMEOUT_S)
    )
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()


def test_the_server_default_applies_to_requests_without_a_deadline(
    strict_gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    url = f"{strict_gateway.url}/v1/completions"
    answer = httpx.post(url, json={**ENDLESS, "prompt": "Default deadline"}, timeout=10)
    assert answer.status_code == 504
    _assert_deadline_error(answer.json())
    assert _submit_of(double, tokenizer, "Default deadline").deadline_unix_ms > 0
    # A request's own timeout replaces the default, longer or shorter.
    longer = {**ENDLESS, "prompt": "Own deadline", "max_tokens": 300, "timeout": 30}
    assert httpx.post(url, json=longer, timeout=10).status_code == 200
    with grpc.insecure_channel(strict_gateway.grpc_target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        endless = api_pb2.GenerateRequest(
            text="Default deadline over gRPC",
            sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True),
        )
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Complete(endless)  # no client deadline: the gateway's own ends it
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < TIMEOUT_S + 1.0


def test_a_bad_request_timeout_flag_is_refused(card: ModelCard, double: SchedulerDouble) -> None:
    with pytest.raises(AssertionError, match="request-timeout"):
        GatewayProcess.start(Path(card.path), double.address, "--request-timeout", "-1")


def test_priority_reaches_the_scheduler_from_rest_and_grpc(
    gateway: GatewayProcess, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    url = gateway.url
    body = {"model": MODEL_NAME, "prompt": "Urgent", "max_tokens": 2, "priority": -5}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200
    assert _submit_of(double, tokenizer, "Urgent").priority == -5
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Later"}], "priority": 9}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10).status_code == 200
    rendered = tokenizer.apply_chat_template(chat["messages"])  # type: ignore[arg-type]
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    submit = double.wait_for(lambda r: double.submit_with_prompt(ids))
    assert submit.priority == 9  # type: ignore[attr-defined]
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        stub.Complete(api_pb2.GenerateRequest(text="Whenever", priority=3))
    assert _submit_of(double, tokenizer, "Whenever").priority == 3
    plain = {"model": MODEL_NAME, "prompt": "Unranked", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=plain, timeout=10).status_code == 200
    assert _submit_of(double, tokenizer, "Unranked").priority == 0  # unset: 0, as in vLLM
