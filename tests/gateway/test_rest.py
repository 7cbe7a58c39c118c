"""The OpenAI-compatible REST API against the scheduler double, with OpenAI's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pagoda.text import Tokenizer
from pagoda.v1 import common_pb2
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def _sse(gateway: GatewayProcess, path: str, body: dict) -> list[str]:
    """The raw data lines of a streamed answer."""
    with httpx.stream("POST", f"{gateway.url}{path}", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_completion_text_finish_reason_and_usage(client: OpenAI, tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=100)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == MODEL_NAME
    [choice] = out.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, REPLIES[0], "stop")
    script = tokenizer.encode(REPLIES[0], add_special_tokens=False)
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(tokenizer.encode("Hello there"))
    assert out.usage.completion_tokens == len(script) + 1  # the EOS counts
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_stream_with_usage_ends_with_done(gateway: GatewayProcess) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "Hello",
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = _sse(gateway, "/v1/completions", body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    assert text == REPLIES[0]
    assert chunks[-2]["choices"][-1]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


def test_chat_with_two_samples(client: OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    texts = {c.index: c.message.content for c in out.choices}
    assert texts == {0: REPLIES[0], 1: REPLIES[1]}
    assert all(c.message.role == "assistant" and c.finish_reason == "stop" for c in out.choices)
    assert out.usage is not None and out.usage.completion_tokens > 20


def test_chat_stream_with_two_samples_and_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {0: REPLIES[0], 1: REPLIES[1]} and finish == {0: "stop", 1: "stop"}
    assert usage is not None and usage.prompt_tokens > 0


def test_a_stop_string_ends_one_sample_and_is_finished_at_the_scheduler(
    client: OpenAI, double: SchedulerDouble
) -> None:
    out = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, stop=["Done"])
    first, second = sorted(out.choices, key=lambda c: c.index)
    assert first.message.content == " The answer is 42. " and first.finish_reason == "stop"
    assert first.model_extra["stop_reason"] == "Done"
    assert second.message.content == REPLIES[1]
    finish = double.wait_for(lambda r: [f for f in r.finishes if f[0] == r.submits[-1].request_id])
    assert finish == [(double.record.submits[-1].request_id, 0, common_pb2.FINISH_REASON_STOP)]


def test_stop_strings_while_streaming_and_kept_in_the_output(gateway: GatewayProcess) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "Hi",
        "max_tokens": 100,
        "stop": "Done",
        "include_stop_str_in_output": True,
        "stream": True,
    }
    chunks = [json.loads(d) for d in _sse(gateway, "/v1/completions", body)[:-1]]
    text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    assert text == " The answer is 42. Done"
    assert chunks[-1]["choices"][0]["stop_reason"] == "Done"


def test_max_tokens_ends_with_length(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_completion_logprobs_have_openais_legacy_shape(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(isinstance(v, float) and v < 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_have_openais_shape(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_echo_puts_the_prompt_before_the_text_with_its_logprobs(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, echo=True)
    assert out.choices[0].text.startswith("Hello") and len(out.choices[0].text) > 5
    out = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=3, echo=True, logprobs=1
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == out.choices[0].text.replace("Hello", "<|bos|>Hello", 1)


def test_a_list_of_prompts_numbers_choices_prompt_times_n_plus_sample(
    client: OpenAI, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode("Token ids")
    for prompt in (["First", "Second"], [ids, ids]):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, n=2, max_tokens=4)
        assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
        by_index = {c.index: c.text for c in out.choices}
        assert by_index[0] == by_index[2] and by_index[1] == by_index[3]
        assert by_index[0] != by_index[1]
    single = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2)
    assert single.usage is not None and single.usage.prompt_tokens == len(ids)


def test_sampling_parameters_reach_the_scheduler(
    client: OpenAI, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    prompt = "Parameters travel"
    client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["x", "y"],
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={"17": -5},
        extra_body={
            "top_k": 4,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 1,
            "stop_token_ids": [9],
            "ignore_eos": True,
            "priority": 3,
        },
    )
    submit = double.submit_with_prompt(tokenizer.encode(prompt))
    assert submit is not None
    s = submit.sampling
    assert (s.max_tokens, s.seed, s.top_k, list(s.stop), list(s.stop_token_ids)) == (
        3,
        7,
        4,
        ["x", "y"],
        [9],
    )
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert s.min_p == pytest.approx(0.1) and s.repetition_penalty == pytest.approx(1.2)
    assert dict(s.logit_bias) == {17: -5.0} and s.ignore_eos and s.min_tokens == 1
    assert submit.priority == 3


def test_models_tokenize_and_detokenize(gateway: GatewayProcess, tokenizer: Tokenizer) -> None:
    models = httpx.get(f"{gateway.url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{gateway.url}/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    tok = httpx.post(f"{gateway.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == tokenizer.encode("Hello world") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 512
    chat = httpx.post(f"{gateway.url}/tokenize", json={"messages": CHAT}).json()
    assert tokenizer.decode(chat["tokens"], skip_special_tokens=False).endswith("assistant:")
    back = httpx.post(f"{gateway.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


def test_probes_and_metrics(gateway: GatewayProcess, client: OpenAI) -> None:
    client.completions.create(model=MODEL_NAME, prompt="Count me", max_tokens=2)
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    assert httpx.get(f"{gateway.url}/ready").status_code == 200
    metrics = httpx.get(f"{gateway.url}/metrics").text
    for name in (
        'vllm:request_success_total{finished_reason="length",model_name="tiny-chat"}',
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        'vllm:num_requests_running{model_name="tiny-chat"}',
        'vllm:num_requests_waiting{model_name="tiny-chat"}',
        'vllm:kv_cache_usage_perc{model_name="tiny-chat"}',
        "pagoda_gateway_requests_in_flight",
        "pagoda_gateway_session_up 1.0",
        'pagoda_gateway_requests_total{api="rest",status="200"}',
    ):
        assert name in metrics, name


def test_a_gateway_without_a_usable_card_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGODA_")}
    for args in ([], ["--model", str(tmp_path / "missing")]):
        command = [sys.executable, "-m", "gateway", *args]
        run = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
        assert run.returncode == 2 and "cannot start" in run.stderr, run.stderr


def test_the_running_gateway_never_loaded_torch(gateway: GatewayProcess) -> None:
    maps = Path(f"/proc/{gateway.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    libraries = maps.read_text()
    assert "libtorch" not in libraries and "transformers" not in libraries
    code = (
        "import sys, gateway.server, gateway.__main__\n"
        "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
