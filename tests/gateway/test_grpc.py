"""The public gRPC API: Generation, health and reflection, errors and cancellation."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagoda.text import Tokenizer
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2, session_pb2
from tests.gateway.conftest import MODEL_NAME, REPLIES
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> api_pb2_grpc.GenerationStub:
    return api_pb2_grpc.GenerationStub(channel)


def _request(**kwargs: object) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(**{"text": "Hi", **kwargs})  # type: ignore[arg-type]


def test_generate_streams_text_with_usage_on_the_last_response(
    stub: api_pb2_grpc.GenerationStub, tokenizer: Tokenizer
) -> None:
    responses = list(stub.Generate(_request(request_id="mine", return_token_ids=True)))
    assert all(r.request_id == "mine" for r in responses)
    text = "".join(c.text for r in responses for c in r.choices)
    ids = [t for r in responses for c in r.choices for t in c.token_ids]
    assert text == REPLIES[0]
    assert ids == tokenizer.encode(REPLIES[0], add_special_tokens=False) + [2]
    last = responses[-1]
    assert last.choices[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.choices[-1].stop_token_id == 2
    assert last.usage.completion_tokens == len(ids)
    assert last.usage.prompt_tokens == len(tokenizer.encode("Hi"))
    assert not any(r.HasField("usage") for r in responses[:-1])


def test_complete_with_two_samples_a_stop_string_and_logprobs(
    stub: api_pb2_grpc.GenerationStub, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode("Token ids in")
    sampling = common_pb2.SamplingParams(n=2, stop=["Done"], logprobs=1)
    out = stub.Complete(_request(token_ids=api_pb2.TokenIds(ids=ids), sampling=sampling))
    first, second = out.choices
    assert (first.text, first.stop_string) == (" The answer is 42. ", "Done")
    assert first.finish_reason == common_pb2.FINISH_REASON_STOP
    assert second.text == REPLIES[1]
    assert all(len(c.logprobs) > 0 and c.logprobs[0].top_token_ids for c in out.choices)
    assert out.usage.prompt_tokens == len(ids) and out.request_id


def test_without_detokenizing_the_ids_come_back_and_the_text_stays_empty(
    stub: api_pb2_grpc.GenerationStub, tokenizer: Tokenizer
) -> None:
    """detokenize=false: the same tokens as with text, returned even without
    return_token_ids, and no text, streamed or whole."""
    with_text = stub.Complete(_request(request_id="a", return_token_ids=True))
    ids = list(with_text.choices[0].token_ids)
    assert ids == tokenizer.encode(REPLIES[0], add_special_tokens=False) + [2]
    sampling = common_pb2.SamplingParams(detokenize=False)
    whole = stub.Complete(_request(request_id="b", sampling=sampling))
    assert list(whole.choices[0].token_ids) == ids and whole.choices[0].text == ""
    assert whole.choices[0].finish_reason == common_pb2.FINISH_REASON_STOP
    streamed = list(stub.Generate(_request(request_id="c", sampling=sampling)))
    assert [t for r in streamed for c in r.choices for t in c.token_ids] == ids
    assert all(c.text == "" for r in streamed for c in r.choices)


def test_chat_messages_are_rendered_by_the_template(stub: api_pb2_grpc.GenerationStub) -> None:
    messages = api_pb2.ChatMessages(messages=[api_pb2.ChatMessage(role="user", content="Hi")])
    out = stub.Complete(
        api_pb2.GenerateRequest(messages=messages, sampling=common_pb2.SamplingParams(max_tokens=3))
    )
    assert out.choices[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    tokens = stub.Tokenize(api_pb2.TokenizeRequest(messages=messages))
    assert "".join(tokens.tokens).endswith("assistant:")
    assert out.usage.prompt_tokens == len(tokens.token_ids)


def test_tokenize_and_list_models(stub: api_pb2_grpc.GenerationStub, tokenizer: Tokenizer) -> None:
    out = stub.Tokenize(api_pb2.TokenizeRequest(text="Hello world"))
    assert list(out.token_ids) == tokenizer.encode("Hello world") and out.max_model_len == 512
    bare = stub.Tokenize(api_pb2.TokenizeRequest(text="Hello world", add_special_tokens=False))
    assert list(bare.token_ids) == tokenizer.encode("Hello world", add_special_tokens=False)
    [model] = stub.ListModels(api_pb2.ListModelsRequest()).models
    assert (model.name, model.vocab_size, list(model.eos_token_ids)) == (MODEL_NAME, 384, [2])


INVALID = grpc.StatusCode.INVALID_ARGUMENT
Sampling = common_pb2.SamplingParams


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (_request(text=""), INVALID),
        (api_pb2.GenerateRequest(), INVALID),
        (_request(sampling=Sampling(temperature=-1)), INVALID),
        (_request(sampling=Sampling(top_p=2)), INVALID),
        (_request(sampling=Sampling(n=5000)), INVALID),
        (_request(sampling=Sampling(max_tokens=0)), INVALID),
        (_request(sampling=Sampling(logit_bias={5000: 1.0})), INVALID),
        (_request(sampling=Sampling(stop=["x"], detokenize=False)), INVALID),
        (_request(token_ids=api_pb2.TokenIds(ids=[1, 5000])), INVALID),
        (_request(sampling=Sampling(max_tokens=10_000_000)), INVALID),
        (_request(token_ids=api_pb2.TokenIds(ids=[5] * 12), sampling=Sampling(max_tokens=501)),
         INVALID),
        (api_pb2.GenerateRequest(messages=api_pb2.ChatMessages(
            messages=[api_pb2.ChatMessage(role="wizard", content="Hi")])), INVALID),
        (_request(model="gpt-9"), grpc.StatusCode.NOT_FOUND),
    ],
)  # fmt: skip
def test_bad_input_is_invalid_argument(
    stub: api_pb2_grpc.GenerationStub, request_: api_pb2.GenerateRequest, code: grpc.StatusCode
) -> None:
    for call in (stub.Complete, lambda r: list(stub.Generate(r))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request_)
        assert caught.value.code() == code, caught.value.details()
        assert caught.value.details()


def test_max_tokens_past_the_context_reads_as_over_rest(
    stub: api_pb2_grpc.GenerationStub, gateway: GatewayProcess
) -> None:
    prompt = [5] * 12
    ids = api_pb2.TokenIds(ids=prompt)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Complete(api_pb2.GenerateRequest(token_ids=ids, sampling=Sampling(max_tokens=600)))
    rest = httpx.post(
        f"{gateway.url}/v1/completions", json={"prompt": prompt, "max_tokens": 600}, timeout=10
    )
    assert rest.status_code == 400
    assert caught.value.details() == rest.json()["error"]["message"]
    assert "you requested 612 tokens (12 in the messages, 600 in the completion)" in rest.text
    fits = stub.Complete(api_pb2.GenerateRequest(token_ids=ids, sampling=Sampling(max_tokens=500)))
    assert fits.usage.prompt_tokens == 12 and fits.choices[0].text == REPLIES[0]


def test_overload_is_resource_exhausted_with_retry_after(
    stub: api_pb2_grpc.GenerationStub, double: SchedulerDouble
) -> None:
    double.reject = session_pb2.Rejected(
        reason=session_pb2.Rejected.QUEUE_FULL, message="full", retry_after_s=3
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Complete(_request())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "3") in caught.value.trailing_metadata()


def test_a_cancelled_rpc_aborts_its_request(
    stub: api_pb2_grpc.GenerationStub, double: SchedulerDouble, tokenizer: Tokenizer
) -> None:
    endless = common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
    prompt = "Cancel me"
    call = stub.Generate(_request(text=prompt, sampling=endless))
    assert next(call).choices
    submit = double.wait_for(lambda r: double.submit_with_prompt(tokenizer.encode(prompt)))
    call.cancel()
    start = time.monotonic()
    double.wait_for(lambda r: submit.request_id in r.aborts, timeout=3)  # type: ignore[attr-defined]
    assert time.monotonic() - start < 1.0
    future = stub.Complete.future(_request(text="Cancel me too", sampling=endless))
    submit = double.wait_for(lambda r: double.submit_with_prompt(tokenizer.encode("Cancel me too")))
    future.cancel()
    double.wait_for(lambda r: submit.request_id in r.aborts, timeout=3)  # type: ignore[attr-defined]


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pagoda.v1.Generation"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"pagoda.v1.Generation", "grpc.health.v1.Health"} <= names
