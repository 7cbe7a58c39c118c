"""The two callers of the request state on the same real scheduler and model runner.

The offline path is ``LLM.generate``; the served path is the gateway's ``RequestTable``
fed by the engine's own scheduler and runner, its finish and abort messages carried
back to that scheduler as a session would carry them. Both must give each prompt
position's logprobs once (n samples, a preempted prefill) and treat ERROR and ABORT
records by the one rule of ``pagoda.text.request_state``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from gateway.metrics import Metrics
from gateway.openai_format import CompletionFormatter
from gateway.requests import ActiveRequest, RequestGroup, RequestTable
from pagoda import LLM, SamplingParams
from pagoda.outputs import RequestOutput
from pagoda.v1 import common_pb2, session_pb2
from scheduler_svc.scheduler import Scheduler
from tests.worker_svc.hf_oracle import build_model

ERROR = common_pb2.FINISH_REASON_ERROR
ABORT = common_pb2.FINISH_REASON_ABORT
# A long prompt before a short one whose prompt logprobs are asked for: with 16 blocks of
# 4 tokens the first one's decode runs out of blocks while the second is in its chunked
# prefill, so the second (the later arrival) is preempted and computes its prompt again.
FIRST, SECOND = list(range(10, 50)), list(range(100, 140))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return build_model("llama", tmp_path_factory.mktemp("request-paths"))


def _engine(model, num_kv_blocks: int) -> LLM:
    return LLM(
        model,
        dtype="float32",
        max_model_len=64,
        num_kv_blocks=num_kv_blocks,
        block_size=4,
        max_num_batched_tokens=8,
        max_num_seqs=4,
        enable_prefix_caching=False,  # every run of the same prompts schedules alike
        show_progress=False,
    )


@pytest.fixture(scope="module")
def roomy(model) -> LLM:
    return _engine(model, 64)


@pytest.fixture(scope="module")
def tight(model) -> LLM:
    return _engine(model, 16)


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def _serve(
    llm: LLM, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
) -> list[ActiveRequest]:
    """The served path: the gateway's request table on ``llm``'s scheduler and runner."""
    scheduler, runner = llm.scheduler, llm.runner
    table = RequestTable(Metrics("m"))
    table.attach(lambda message: _carry(scheduler, message))
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        request = ActiveRequest.create(f"g{i}", prompt, p, llm.get_tokenizer(), asyncio.Event())
        table.add(request)
        submit = session_pb2.Submit(request_id=request.request_id, prompt_token_ids=prompt)
        submit.sampling.CopyFrom(p.to_proto())
        scheduler.add(submit, time.monotonic())
        requests.append(request)
    while scheduler.has_unfinished():
        result = runner.execute(scheduler.schedule(0, time.monotonic()))
        outputs = scheduler.update(result).get("")
        if outputs is not None:
            table.on_outputs(outputs)
    assert len(table) == 0 and all(r.done and r.error is None for r in requests)
    return requests


def _carry(scheduler: Scheduler, message: session_pb2.GatewayMessage) -> None:
    kind = message.WhichOneof("kind")
    if kind == "finish":
        scheduler.finish(message.finish.request_id, message.finish.index)
    elif kind == "abort":
        scheduler.abort(message.abort.request_id)


def _rest_prompt_logprobs(llm: LLM, request: ActiveRequest) -> list[float | None]:
    """The prompt's part of a REST ``echo`` answer's ``token_logprobs``, one per choice."""
    tokenizer = llm.get_tokenizer()
    formatter = CompletionFormatter(
        model="m",
        n=request.params.n,
        token_text=lambda t: tokenizer.decode([t]),
        logprobs=0,
        echo_texts=[tokenizer.decode(request.prompt_token_ids)],
    )
    body = formatter.response(RequestGroup([request], asyncio.Event()))
    lists = [c["logprobs"]["token_logprobs"] for c in body["choices"]]
    assert all(values == lists[0] for values in lists)
    return lists[0][: len(request.prompt_token_ids)]


def _check_offline(out: RequestOutput, prompt: list[int], want: RequestOutput) -> None:
    """vLLM's shape: one entry per prompt token, the first None, each holding its token."""
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for token, got, ref in zip(
        prompt[1:], out.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True
    ):
        assert got[token].logprob == pytest.approx(ref[token].logprob, abs=1e-4)


def _check_served(llm: LLM, request: ActiveRequest, prompt: list[int], want: RequestOutput) -> None:
    """One entry per prompt token after the first, in the gRPC answer's shape and REST's."""
    entries = request.prompt_logprobs
    assert [e.token_id for e in entries] == prompt[1:]
    refs = [p[t].logprob for t, p in zip(prompt[1:], want.prompt_logprobs[1:], strict=True)]
    assert [e.logprob for e in entries] == pytest.approx(refs, abs=1e-4)
    rest = _rest_prompt_logprobs(llm, request)
    assert rest[0] is None and rest[1:] == pytest.approx(refs, abs=1e-4)


def test_n_samples_give_each_prompt_position_once_on_both_paths(roomy: LLM) -> None:
    prompt = list(range(10, 30))
    one = roomy.generate([{"prompt_token_ids": prompt}], greedy(max_tokens=4, prompt_logprobs=0))
    params = greedy(n=2, max_tokens=4, prompt_logprobs=0)
    (offline,) = roomy.generate([{"prompt_token_ids": prompt}], params)
    _check_offline(offline, prompt, one[0])
    (served,) = _serve(roomy, [prompt], [params])
    _check_served(roomy, served, prompt, one[0])


def test_a_preempted_prefill_gives_each_prompt_position_once_on_both_paths(
    roomy: LLM, tight: LLM
) -> None:
    params = [greedy(max_tokens=20), greedy(max_tokens=4, prompt_logprobs=1)]
    want = roomy.generate([FIRST, SECOND], params)
    assert roomy.scheduler.num_preemptions == 0
    offline = tight.generate([FIRST, SECOND], params)
    preempted = tight.scheduler.num_preemptions
    assert preempted > 0, "the test needs the second prompt's prefill to be preempted"
    _check_offline(offline[1], SECOND, want[1])
    assert [o.outputs[0].token_ids for o in offline] == [o.outputs[0].token_ids for o in want]
    served = _serve(tight, [FIRST, SECOND], params)
    assert tight.scheduler.num_preemptions > preempted
    _check_served(tight, served[1], SECOND, want[1])
    assert [r.samples[0].token_ids for r in served] == [o.outputs[0].token_ids for o in want]


def _record(request_id: str, reason: int) -> session_pb2.StepOutputs:
    out = session_pb2.StepOutputs()
    out.finished.add(request_id=request_id, index=1, reason=reason)
    return out


@pytest.mark.parametrize("reason", [ERROR, ABORT])
def test_error_and_scheduler_abort_records_fail_the_request_on_both_paths(
    roomy: LLM, reason: int
) -> None:
    prompt, params = [5, 6, 7, 8], greedy(n=2, max_tokens=8)
    scheduler = roomy.scheduler
    # Offline: an ERROR raises out of generate (which then aborts what it queued); an
    # ABORT ends the siblings at the scheduler and returns the request ending "abort".
    request = roomy._submit(None, prompt, params, 0)
    by_id = {request.request_id: request}
    if reason == ERROR:
        with pytest.raises(RuntimeError, match="generation failed inside the engine"):
            roomy._deliver(_record(request.request_id, reason), by_id)
        assert scheduler.abort(request.request_id)
    else:
        assert roomy._deliver(_record(request.request_id, reason), by_id) == 1
        out = request.output()
        assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]
    assert not scheduler.has_unfinished()
    # Served: the request fails (500, or a retryable 503 far from its deadline) and its
    # siblings are aborted at the scheduler.
    sent: list[session_pb2.GatewayMessage] = []
    table = RequestTable(Metrics("m"))
    table.attach(sent.append)
    active = ActiveRequest.create("g", prompt, params, roomy.get_tokenizer(), asyncio.Event())
    table.add(active)
    table.on_outputs(_record("g", reason))
    assert active.error is not None and active.error.status == (500 if reason == ERROR else 503)
    assert [m.abort.request_id for m in sent] == ["g"] and len(table) == 0
