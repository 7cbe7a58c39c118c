"""The stack from ``pagoda serve`` against the offline ``pagoda.LLM``, through every API.

``pagoda serve`` with one and with two worker replicas on the tiny random Llama (fp32) serves
the official ``openai`` client, a Python gRPC client and a Node.js gRPC client; every
greedy answer must equal the offline engine's for the same prompt (the near-tie
rule of tests/worker_svc/hf_oracle.py applies where the two differ).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import httpx
import openai
import pytest

from pagoda import LLM, SamplingParams
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2
from tests.e2e.stack import REPO, Serve, pagoda_processes, tiny_model

MAX_TOKENS = 12
PROMPTS = ["The quick brown fox", "Once upon a time, in a land", "abc"]
NODE_CLIENT = REPO / "tests" / "e2e" / "node" / "generate.js"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("e2e-serve"))


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def stack(model, request):
    serve = Serve(
        model, workers=request.param,
        extra=["--dtype", "float32", "--seed", "0", "--max-model-len", "256",
               "--kv-cache-memory", "64MiB"],
    )  # fmt: skip
    yield serve
    assert serve.stop() == 0, serve.log
    assert not pagoda_processes(str(model)), "a child of pagoda serve outlived it"


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model, dtype="float32", max_model_len=256, show_progress=False)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def test_completions_equal_the_offline_engine(client, model_name, offline):
    want = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, want, strict=True):
        got = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        choice = got.choices[0]
        assert choice.text == ref.outputs[0].text
        assert choice.finish_reason == ref.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_a_list_of_prompts_is_one_choice_each(client, model_name, offline):
    want = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy(), use_tqdm=False)]
    got = client.completions.create(
        model=model_name, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == want


def test_streamed_completion_equals_the_whole_one(client, model_name, offline):
    ref = offline.generate(PROMPTS[1], greedy(), use_tqdm=False)[0].outputs[0]
    stream = client.completions.create(
        model=model_name, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == ref.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_equals_the_offline_engine_streamed_or_not(client, model_name, offline):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    ref = offline.chat(messages, greedy(), use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.text
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_n_samples_logprobs_and_seed(client, model_name):
    kwargs = dict(model=model_name, prompt=PROMPTS[0], max_tokens=6, temperature=0.9, n=2,
                  seed=7, logprobs=2)  # fmt: skip
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    for choice in first.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
        assert all(len(top) >= 1 for top in lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs)
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices], "seeded"


def test_stop_string_ends_the_text_as_offline(client, model_name, offline):
    ref = offline.generate(PROMPTS[0], greedy(24), use_tqdm=False)[0].outputs[0].text
    stop = next(
        ref[k : k + 2] for k in range(len(ref) // 3, len(ref) - 2) if ref[k : k + 2].isalpha()
    )
    want = offline.generate(PROMPTS[0], greedy(24, stop=[stop]), use_tqdm=False)[0].outputs[0]
    got = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop]
    )
    choice = got.choices[0]
    assert (choice.text, choice.finish_reason) == (want.text, want.finish_reason)
    assert stop not in choice.text and len(choice.text) < len(ref)


def grpc_generate(address: str, token_ids: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        request = api_pb2.GenerateRequest(
            token_ids=api_pb2.TokenIds(ids=token_ids),
            sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True
            ),
            return_token_ids=True,
        )
        tokens: list[int] = []
        for response in stub.Generate(request, timeout=60):
            for choice in response.choices:
                tokens.extend(choice.token_ids)
        return tokens


def test_python_and_node_grpc_clients_get_the_offline_tokens(stack, offline):
    prompt = offline.get_tokenizer().encode(PROMPTS[0])
    ref = offline.generate({"prompt_token_ids": prompt}, greedy(ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert grpc_generate(stack.grpc_addr, prompt, MAX_TOKENS) == list(ref.token_ids)
    node = shutil.which("node")
    if node is None or not (NODE_CLIENT.parent / "node_modules").is_dir():
        pytest.fail("the Node.js client is not installed (scripts/setup.sh installs it)")
    request = json.dumps({"token_ids": prompt, "max_tokens": MAX_TOKENS})
    out = subprocess.run(
        [node, str(NODE_CLIENT), stack.grpc_addr, request],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == list(ref.token_ids)
    assert result["finish_reason"] == "FINISH_REASON_LENGTH"
    assert result["text"] == ref.text


def test_malformed_requests_get_their_4xx_from_the_real_stack(stack, client, model_name):
    """The gateway's table of bad requests, against the real scheduler and workers."""
    from tests.gateway.conftest import MODEL_NAME
    from tests.gateway.test_bad_requests import CASES

    cases = [c for c in CASES if "over the limit" not in c[0]]
    assert len(cases) >= 25
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        for name, method, path, kwargs, status, _ in cases:
            if "json" in kwargs:  # the table names the test double's model
                text = json.dumps(kwargs["json"]).replace(f'"{MODEL_NAME}"', f'"{model_name}"')
                kwargs = {"json": json.loads(text)}
            response = http.request(method, path, **kwargs)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["message"] and "type" in error and "code" in error, name
    ok = client.completions.create(model=model_name, prompt="abc", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3
