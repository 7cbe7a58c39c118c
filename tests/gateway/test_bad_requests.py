"""Bad input gets the right 4xx with an OpenAI-style body, and the gateway keeps serving.

Also: the scheduler's refusals (queue full, draining, invalid) and the API key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from pagoda.model_card.card import ModelCard
from pagoda.v1 import session_pb2
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

LIMIT = 64 * 1024
M = {"model": MODEL_NAME}
CHAT = {**M, "messages": [{"role": "user", "content": "Hi"}]}
CMPL = {**M, "prompt": "Hi"}


@pytest.fixture(scope="module")
def gateway(card: ModelCard, double: SchedulerDouble) -> Iterator[GatewayProcess]:
    process = GatewayProcess.start(Path(card.path), double.address, "--max-body-bytes", str(LIMIT))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()


def _chunked(size: int) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(size // 1024):
        yield b"a" * 1024
    yield b'"}'


# (name, method, path, httpx keyword arguments, status, param)
CASES: list[tuple[str, str, str, dict[str, Any], int, str | None]] = [
    ("bad JSON", "POST", "/v1/completions", {"content": b'{"model": '}, 400, None),
    ("invalid UTF-8", "POST", "/v1/completions", {"content": b'{"prompt": "\xff"}'}, 400, None),
    ("not an object", "POST", "/v1/completions", {"json": [1, 2]}, 400, None),
    ("empty body", "POST", "/v1/chat/completions", {"content": b""}, 400, None),
    ("no prompt", "POST", "/v1/completions", {"json": M}, 400, "prompt"),
    ("no messages", "POST", "/v1/chat/completions", {"json": M}, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", {"json": {**M, "messages": []}}, 400,
     "messages"),
    ("prompt of a wrong type", "POST", "/v1/completions", {"json": {**M, "prompt": 5}}, 400,
     "prompt"),
    ("empty prompt", "POST", "/v1/completions", {"json": {**M, "prompt": ""}}, 400, "prompt"),
    ("empty prompt list", "POST", "/v1/completions", {"json": {**M, "prompt": []}}, 400,
     "prompt"),
    ("unknown model", "POST", "/v1/completions", {"json": {**CMPL, "model": "gpt-9"}}, 404,
     "model"),
    ("prompt over max_model_len", "POST", "/v1/completions",
     {"json": {**M, "prompt": "word " * 2000}}, 400, "prompt"),
    ("token id past the vocabulary", "POST", "/v1/completions",
     {"json": {**M, "prompt": [1, 99999]}}, 400, "prompt"),
    ("negative token id", "POST", "/v1/completions", {"json": {**M, "prompt": [-1]}}, 400,
     "prompt"),
    ("temperature < 0", "POST", "/v1/completions", {"json": {**CMPL, "temperature": -1}}, 400,
     "temperature"),
    ("temperature not a number", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "temperature": "hot"}}, 400, "temperature"),
    ("top_p = 0", "POST", "/v1/completions", {"json": {**CMPL, "top_p": 0}}, 400, "top_p"),
    ("top_p > 1", "POST", "/v1/chat/completions", {"json": {**CHAT, "top_p": 1.5}}, 400,
     "top_p"),
    ("n = 0", "POST", "/v1/completions", {"json": {**CMPL, "n": 0}}, 400, "n"),
    ("huge n", "POST", "/v1/chat/completions", {"json": {**CHAT, "n": 100000}}, 400, "n"),
    ("max_tokens = 0", "POST", "/v1/completions", {"json": {**CMPL, "max_tokens": 0}}, 400,
     "max_tokens"),
    ("negative max_tokens", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "max_tokens": -5}}, 400, "max_tokens"),
    ("max_completion_tokens = 0", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "max_completion_tokens": 0}}, 400, "max_completion_tokens"),
    ("min_tokens > max_tokens", "POST", "/v1/completions",
     {"json": {**CMPL, "max_tokens": 2, "min_tokens": 5}}, 400, "min_tokens"),
    ("logit_bias key not a token id", "POST", "/v1/completions",
     {"json": {**CMPL, "logit_bias": {"abc": 1}}}, 400, "logit_bias"),
    ("logit_bias value > 100", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "logit_bias": {"5": 200}}}, 400, "logit_bias"),
    ("logit_bias token past the vocabulary", "POST", "/v1/completions",
     {"json": {**CMPL, "logit_bias": {"100000": 1}}}, 400, "logit_bias"),
    ("empty stop string", "POST", "/v1/completions", {"json": {**CMPL, "stop": [""]}}, 400,
     "stop"),
    ("presence_penalty > 2", "POST", "/v1/completions",
     {"json": {**CMPL, "presence_penalty": 5}}, 400, "presence_penalty"),
    ("seed past int64", "POST", "/v1/completions", {"json": {**CMPL, "seed": 2**70}}, 400,
     "seed"),
    ("logprobs > 20", "POST", "/v1/completions", {"json": {**CMPL, "logprobs": 50}}, 400,
     "logprobs"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "top_logprobs": 2}}, 400, "top_logprobs"),
    ("top_logprobs > 20", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "logprobs": True, "top_logprobs": 50}}, 400, "top_logprobs"),
    ("stream_options without stream", "POST", "/v1/completions",
     {"json": {**CMPL, "stream_options": {"include_usage": True}}}, 400, "stream_options"),
    ("image content part", "POST", "/v1/chat/completions",
     {"json": {**M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, 400,
     "messages"),
    ("message without a role", "POST", "/v1/chat/completions",
     {"json": {**M, "messages": [{"content": "Hi"}]}}, 400, "messages"),
    ("unknown role", "POST", "/v1/chat/completions",
     {"json": {**M, "messages": [{"role": "wizard", "content": "Hi"}]}}, 400, "messages"),
    ("tool message without tool_call_id", "POST", "/v1/chat/completions",
     {"json": {**M, "messages": [{"role": "tool", "content": "42"}]}}, 400, "messages"),
    ("tokenize an unknown role", "POST", "/tokenize",
     {"json": {"messages": [{"role": "wizard", "content": "Hi"}]}}, 400, "messages"),
    ("max_tokens past the context", "POST", "/v1/completions",
     {"json": {**CMPL, "max_tokens": 10_000_000}}, 400, "max_tokens"),
    ("prompt and max_tokens over the context by one", "POST", "/v1/completions",
     {"json": {**M, "prompt": [5] * 12, "max_tokens": 501}}, 400, "max_tokens"),
    ("max_completion_tokens past the context", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "max_completion_tokens": 10_000_000}}, 400, "max_completion_tokens"),
    ("deprecated chat max_tokens past the context", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "max_tokens": 10_000_000}}, 400, "max_tokens"),
    ("suffix", "POST", "/v1/completions", {"json": {**CMPL, "suffix": "end"}}, 400, "suffix"),
    ("tool_choice auto", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "tools": [], "tool_choice": "auto"}}, 400, "tool_choice"),
    ("json response_format", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "response_format": {"type": "json_object"}}}, 400, "response_format"),
    ("continue_final_message with add_generation_prompt", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "continue_final_message": True}}, 400, "messages"),
    ("tokenize both prompt and messages", "POST", "/tokenize",
     {"json": {"prompt": "a", "messages": CHAT["messages"]}}, 400, "prompt"),
    ("detokenize past the vocabulary", "POST", "/detokenize", {"json": {"tokens": [99999]}},
     400, "tokens"),
    ("timeout = 0", "POST", "/v1/completions", {"json": {**CMPL, "timeout": 0}}, 400,
     "timeout"),
    ("negative timeout", "POST", "/v1/chat/completions", {"json": {**CHAT, "timeout": -2}},
     400, "timeout"),
    ("timeout not a number", "POST", "/v1/completions", {"json": {**CMPL, "timeout": "soon"}},
     400, "timeout"),
    ("priority not an integer", "POST", "/v1/completions",
     {"json": {**CMPL, "priority": "high"}}, 400, "priority"),
    ("priority past int32", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "priority": 2**40}}, 400, "priority"),
    ("infinite timeout", "POST", "/v1/completions",
     {"content": b'{"prompt": "Hi", "timeout": 1e999}'}, 400, "timeout"),
    # Types are strict, as /openapi.json says them (no "2" for 2, no 1 for true).
    ("n as a numeric string", "POST", "/v1/completions", {"json": {**CMPL, "n": "2"}}, 400,
     "n"),
    ("temperature as a numeric string", "POST", "/v1/chat/completions",
     {"json": {**CHAT, "temperature": "0.5"}}, 400, "temperature"),
    ("stream as 1", "POST", "/v1/chat/completions", {"json": {**CHAT, "stream": 1}}, 400,
     "stream"),
    ("token ids as floats", "POST", "/v1/completions", {"json": {**M, "prompt": [1.0, 2.0]}},
     400, "prompt"),
    ("detokenize tokens as strings", "POST", "/detokenize", {"json": {"tokens": ["1"]}}, 400,
     "tokens"),
    ("NaN temperature", "POST", "/v1/completions",
     {"content": b'{"prompt": "Hi", "temperature": NaN}'}, 400, "temperature"),
    ("nesting past the parser's limit", "POST", "/v1/completions",
     {"content": b'{"prompt": ' + b"[" * 300 + b"]" * 300 + b"}"}, 400, None),
    ("an integer past the parser's range", "POST", "/v1/completions",
     {"content": b'{"prompt": "Hi", "n": ' + b"9" * 5000 + b"}"}, 400, None),
    ("timeout past what Submit.deadline_unix_ms holds", "POST", "/v1/completions",
     {"json": {**CMPL, "timeout": 3.8e16}}, 400, "timeout"),
    ("unknown route", "GET", "/v1/nothing", {}, 404, None),
    ("wrong method", "GET", "/v1/completions", {}, 405, None),
    ("body over the limit", "POST", "/v1/completions",
     {"json": {**M, "prompt": "a" * (LIMIT + 10)}}, 413, None),
    ("chunked body over the limit", "POST", "/v1/completions",
     {"content": _chunked(LIMIT + 4096)}, 413, None),
]  # fmt: skip


def test_every_malformed_request_gets_its_4xx_and_the_gateway_keeps_serving(
    gateway: GatewayProcess,
) -> None:
    assert len(CASES) >= 25
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for name, method, path, kwargs, status, param in CASES:
            if name.startswith("chunked"):
                kwargs = {"content": _chunked(LIMIT + 4096)}  # a generator is read once
            response = http.request(method, path, **kwargs)
            assert response.status_code == status, (name, response.text)
            body = response.json()
            assert set(body) == {"error"}, name
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert isinstance(error["message"], str) and error["message"], name
            assert isinstance(error["type"], str), name
            assert error["param"] == param, (name, error)
        ok = http.post("/v1/completions", json={**CMPL, "max_tokens": 100})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == REPLIES[0]
    assert "Traceback" not in gateway.log()


def _context_message(prompt_tokens: int, max_tokens: int) -> str:
    return (
        f"This model's maximum context length is 512 tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion."
    )


def test_max_tokens_past_the_context_is_refused_with_vllms_words(gateway: GatewayProcess) -> None:
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt=[5] * 12, max_tokens=10_000_000)
    assert caught.value.body["message"] == _context_message(12, 10_000_000)  # type: ignore[index]
    assert caught.value.param == "max_tokens"
    fits = client.completions.create(model=MODEL_NAME, prompt=[5] * 12, max_tokens=500)
    assert fits.choices[0].finish_reason == "stop"

    messages = CHAT["messages"]
    rendered = httpx.post(f"{gateway.url}/tokenize", json={"messages": messages}).json()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_completion_tokens=1000,  # type: ignore[arg-type]
        )
    assert caught.value.body["message"] == _context_message(rendered["count"], 1000)  # type: ignore[index]
    assert caught.value.param == "max_completion_tokens"
    # Without max_tokens, chat generates until the model stops or the context ends.
    unbounded = client.chat.completions.create(model=MODEL_NAME, messages=messages)  # type: ignore[arg-type]
    assert unbounded.choices[0].message.content == REPLIES[0]


def test_every_openai_role_is_accepted(gateway: GatewayProcess) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ]
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions", json={**M, "messages": messages}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == REPLIES[0]


def test_unknown_model_is_openais_model_not_found(gateway: GatewayProcess) -> None:
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_429_with_retry_after(
    gateway: GatewayProcess, double: SchedulerDouble, stream: bool
) -> None:
    double.reject = session_pb2.Rejected(
        reason=session_pb2.Rejected.QUEUE_FULL, message="queue full", retry_after_s=2
    )
    response = httpx.post(f"{gateway.url}/v1/completions", json={**CMPL, "stream": stream})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["message"] == "queue full"


def test_a_draining_or_refusing_scheduler_maps_to_503_and_400(
    gateway: GatewayProcess, double: SchedulerDouble
) -> None:
    double.reject = session_pb2.Rejected(reason=session_pb2.Rejected.DRAINING, message="bye")
    assert httpx.post(f"{gateway.url}/v1/completions", json=CMPL).status_code == 503
    double.reject = session_pb2.Rejected(reason=session_pb2.Rejected.INVALID, message="no")
    response = httpx.post(f"{gateway.url}/v1/completions", json=CMPL)
    assert response.status_code == 400 and response.json()["error"]["message"] == "no"


def test_the_api_key_guards_the_api_but_not_the_probes(
    card: ModelCard, double: SchedulerDouble
) -> None:
    secured = GatewayProcess.start(Path(card.path), double.address, "--api-key", "s3cret")
    try:
        secured.wait_ready()
        url = secured.url
        for path in ("/v1/models", "/tokenize"):
            method = httpx.get if path == "/v1/models" else httpx.post
            kwargs = {} if path == "/v1/models" else {"json": {"prompt": "a"}}
            assert method(f"{url}{path}", **kwargs).status_code == 401  # type: ignore[operator]
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        good = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        for probe in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{probe}").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        client = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        out = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        assert out.usage is not None and out.usage.completion_tokens == 2
    finally:
        assert secured.stop() == 0
