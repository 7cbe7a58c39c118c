"""RequestState and apply_step: one step's outputs applied to a table of requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.text import Tokenizer
from pagoda.text.request_state import Failure, RequestState, apply_step
from pagoda.v1 import common_pb2, session_pb2

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT
ERROR = common_pb2.FINISH_REASON_ERROR


@pytest.fixture(scope="module")
def tok(bytelevel_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(bytelevel_dir)


def _state(tok: Tokenizer, prompt: list[int] | None = None, **params: object) -> RequestState:
    prompt = prompt if prompt is not None else tok.encode("Say:")
    return RequestState.start("r", prompt, SamplingParams(**params), tok)


def _tokens(tokens: dict[int, int], rid: str = "r") -> session_pb2.StepOutputs:
    return session_pb2.StepOutputs(
        request_ids=[rid] * len(tokens), indices=list(tokens), token_ids=list(tokens.values())
    )


def _finished(index: int, reason: int, **fields: object) -> session_pb2.StepOutputs:
    out = session_pb2.StepOutputs()
    out.finished.add(request_id="r", index=index, reason=reason, **fields)
    return out


def _prompt(index: int, token_ids: list[int]) -> session_pb2.StepOutputs:
    out = session_pb2.StepOutputs()
    out.logprobs.add(
        request_id="r",
        index=index,
        prompt=[common_pb2.TokenLogprobs(token_id=t, logprob=-1.0, rank=1) for t in token_ids],
    )
    return out


def test_each_prompt_position_is_kept_once_whichever_samples_send_it(tok: Tokenizer) -> None:
    prompt = [5, 6, 7, 8, 9, 10]
    state = _state(tok, prompt, n=2, prompt_logprobs=0)
    states = {"r": state}
    # Each sequence computes the prompt's logprobs, in chunks of its own.
    first = apply_step(_prompt(1, prompt[1:4]), states)
    apply_step(_prompt(0, prompt[1:6]), states)
    last = apply_step(_prompt(1, prompt[4:6]), states)
    assert [e.token_id for e in state.prompt_logprobs] == prompt[1:]
    assert [e.token_id for e in first["r"].prompt_logprobs] == prompt[1:4]
    assert [e.token_id for e in last["r"].prompt_logprobs] == prompt[4:6]
    # A sender that repeats itself adds nothing past the prompt.
    again = apply_step(_prompt(1, prompt[1:6]), states)
    assert len(state.prompt_logprobs) == len(prompt) - 1 and again["r"].prompt_logprobs == []


def test_a_stop_string_ends_one_sample_and_its_late_tokens_are_dropped(tok: Tokenizer) -> None:
    state = _state(tok, n=2, stop=["STOP"])
    states = {"r": state}
    ids = tok.encode(" one STOP two", add_special_tokens=False)
    other = tok.encode(" one two three four five", add_special_tokens=False)[: len(ids)]
    stopped = []
    for a, b in zip(ids, other, strict=True):
        report = apply_step(_tokens({0: a, 1: b}), states)["r"]
        stopped += report.stopped
        assert report.got_tokens
    first, second = state.samples
    assert stopped == [0] and (first.finish_reason, first.stop_reason) == ("stop", "STOP")
    assert first.text == " one " and len(first.token_ids) < len(ids)
    assert second.token_ids == other and not second.finished
    # The scheduler's record for the stopped sequence changes nothing; the sibling's ends it.
    apply_step(_finished(0, STOP, stop_token_id=2), states)
    assert first.stop_reason == "STOP" and not state.done
    report = apply_step(_finished(1, LENGTH, num_cached_tokens=3), states)["r"]
    assert state.done and report.failure is None and state.failure is None
    assert second.finish_reason == "length" and state.num_cached_tokens == 3


@pytest.mark.parametrize(("reason", "name"), [(ERROR, "error"), (ABORT, "abort")])
def test_an_error_or_abort_record_fails_the_request_and_ends_what_it_applies(
    tok: Tokenizer, reason: int, name: str
) -> None:
    state = _state(tok, n=2)
    states = {"r": state}
    apply_step(_tokens({0: 40, 1: 41}), states)
    step = _finished(1, reason)
    step.request_ids.append("r")
    step.indices.append(0)
    step.token_ids.append(42)
    report = apply_step(step, states)["r"]
    assert report.failure == state.failure == Failure(name, 1)
    assert state.samples[0].token_ids == [40, 42] and not state.done
    # Nothing more is applied to a failed request, its siblings' records included.
    assert apply_step(_tokens({0: 43}), states) == {}
    assert apply_step(_finished(0, LENGTH), states) == {}
    assert state.samples[0].token_ids == [40, 42] and not state.samples[0].finished


def test_an_abort_record_after_a_stop_string_is_no_failure(tok: Tokenizer) -> None:
    state = _state(tok, stop=["STOP"])
    states = {"r": state}
    for token in tok.encode(" a STOP", add_special_tokens=False):
        apply_step(_tokens({0: token}), states)
    assert state.done
    assert apply_step(_finished(0, ABORT), states)["r"].failure is None
    assert state.failure is None and state.samples[0].finish_reason == "stop"


def test_entries_of_unknown_requests_and_samples_are_dropped(tok: Tokenizer) -> None:
    state = _state(tok, n=1)
    states = {"r": state}
    assert apply_step(_tokens({0: 40}, rid="other"), states) == {}
    assert apply_step(_tokens({1: 40}), states) == {}
    assert apply_step(_finished(3, ERROR), states) == {}
    assert state.samples[0].token_ids == [] and state.failure is None
