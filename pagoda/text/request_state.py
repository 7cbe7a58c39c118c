"""One request's output as the scheduler's steps build it up, for the gateway and ``LLM``.

The scheduler sends one ``StepOutputs`` per step for all the requests of a caller (a
gateway session, or the offline ``pagoda.LLM``). ``apply_step`` applies one to a table
of ``RequestState`` and reports what happened to each request it touched; the callers
keep only what is theirs (wake-ups, metrics and deadlines at the gateway, the progress
bar offline) and tell their scheduler what the report asks for. So the two paths can
never disagree on what a request's output is:

- A token goes through its sample's text pipeline (``SampleStream``). One that
  completes a stop string ends that sample at once with reason "stop"; the report
  lists it, and the caller finishes that one sequence at the scheduler (its siblings
  go on). Tokens that arrive after a sample ended are dropped.
- A STOP or LENGTH record ends its sample, unless a stop string ended it here first.
- An ERROR record (generation failed inside the engine) or an ABORT record (the
  scheduler ended the sequence unasked: its deadline passed there, or a draining
  scheduler dropped it before it ran) fails the whole request: ``failure`` is set,
  nothing more is applied to it, and the caller ends its siblings at the scheduler.
  Neither caller ever finishes a sequence with ABORT itself, so an ABORT record is
  always the scheduler's. The gateway answers an ERROR with 500 and an ABORT with 504
  near the request's deadline, else a retryable 503. The offline engine raises a
  RuntimeError from ``generate`` for an ERROR (as vLLM does when its engine fails);
  its in-process scheduler makes no ABORT today (the engine sets no deadline and
  never drains), and should one come, the request is returned with its unfinished
  samples ending "abort", as vLLM reports an aborted request.
- Prompt logprobs are kept once per prompt position: every sequence of a request
  computes them, so the first sample that sends some is the one kept, at most one
  entry per prompt token after the first. The scheduler sends each position of a
  sequence once, in order, even when a preemption makes it compute its prompt again.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from pagoda.sampling_params import SamplingParams
from pagoda.text.sample_stream import FINISH_REASONS, SampleDelta, SampleStream
from pagoda.text.tokenizer import Tokenizer
from pagoda.v1 import common_pb2, session_pb2

# The records that fail a request instead of ending one sample.
_FAILING = (common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_ABORT)


@dataclass(frozen=True)
class Failure:
    """Why a request failed: "error" or "abort", and the sample whose record said so."""

    reason: str
    index: int


@dataclass
class StepReport:
    """What one step did to one request."""

    # Tokens arrived for it (late ones for a sample that had ended count too).
    got_tokens: bool = False
    # Samples a stop string ended in this step: finish these sequences at the scheduler.
    stopped: list[int] = field(default_factory=list)
    # Prompt logprobs kept in this step, for the positions after those kept before.
    prompt_logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    # Set when this step failed the request: end its other sequences at the scheduler.
    failure: Failure | None = None


@dataclass(eq=False)
class RequestState:
    """One prompt and its n samples, from submit until every sample has ended."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleStream]
    # One entry per prompt token after the first (nothing predicts the first).
    prompt_logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    failure: Failure | None = None
    # The sample whose prompt logprobs are kept.
    _prompt_logprobs_index: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def start(
        cls,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
        **extra: Any,
    ) -> Self:
        """A fresh request; ``extra`` fills the fields a caller's subclass adds."""
        prompt = list(prompt_token_ids)
        samples = [SampleStream.start(i, tokenizer, prompt, params) for i in range(params.n)]
        return cls(request_id, prompt, params, samples, **extra)

    @property
    def done(self) -> bool:
        """Every sample has ended."""
        return all(s.finished for s in self.samples)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    def take_deltas(self) -> list[SampleDelta]:
        """What each sample added since the last call, in sample order."""
        return [d for s in self.samples if (d := s.take_delta()) is not None]

    def add_prompt_logprobs(
        self, index: int, entries: Iterable[common_pb2.TokenLogprobs]
    ) -> list[common_pb2.TokenLogprobs]:
        """Keep sample ``index``'s next prompt logprobs if its are the ones kept; returns
        the entries kept."""
        if self._prompt_logprobs_index is None:
            self._prompt_logprobs_index = index
        if index != self._prompt_logprobs_index:
            return []
        room = len(self.prompt_token_ids) - 1 - len(self.prompt_logprobs)
        kept = list(entries)[: max(room, 0)]
        self.prompt_logprobs.extend(kept)
        return kept

    def end_sample(self, fin: session_pb2.SequenceFinished) -> Failure | None:
        """Apply a sequence's final record; returns the failure it makes, if any."""
        self.num_cached_tokens = max(self.num_cached_tokens, fin.num_cached_tokens)
        sample = self.samples[fin.index]
        if sample.finished:  # a stop string ended it here first
            return None
        if fin.reason in _FAILING:
            self.failure = Failure(FINISH_REASONS[fin.reason], fin.index)
            return self.failure
        stop = fin.stop_token_id if fin.HasField("stop_token_id") else None
        sample.finish(FINISH_REASONS.get(fin.reason, "abort"), stop)
        return None


def apply_step(
    outputs: session_pb2.StepOutputs, states: Mapping[str, RequestState]
) -> dict[str, StepReport]:
    """Apply one step to the requests in ``states``: tokens, then logprobs, then final
    records, the order in which they happened. Entries of a request that is not there
    (aborted, finished) or has failed are dropped. Returns a report per request touched."""
    reports: dict[str, StepReport] = {}
    for rid, index, token in zip(
        outputs.request_ids, outputs.indices, outputs.token_ids, strict=True
    ):
        state = _live(states, rid, index)
        if state is None:
            continue
        report = _report(reports, rid)
        report.got_tokens = True
        sample = state.samples[index]
        stop = sample.add_token(token)
        if stop is not None:
            sample.finish("stop", stop)
            report.stopped.append(index)
    for delta in outputs.logprobs:
        state = _live(states, delta.request_id, delta.index)
        if state is None:
            continue
        report = _report(reports, delta.request_id)
        if delta.prompt:
            report.prompt_logprobs += state.add_prompt_logprobs(delta.index, delta.prompt)
        state.samples[delta.index].add_logprobs(delta.tokens)
    for fin in outputs.finished:
        state = _live(states, fin.request_id, fin.index)
        if state is None:
            continue
        _report(reports, fin.request_id).failure = state.end_sample(fin)
    return reports


def _live(states: Mapping[str, RequestState], rid: str, index: int) -> RequestState | None:
    state = states.get(rid)
    if state is None or state.failure is not None or index >= len(state.samples):
        return None
    return state


def _report(reports: dict[str, StepReport], rid: str) -> StepReport:
    report = reports.get(rid)
    if report is None:
        report = reports[rid] = StepReport()
    return report
