"""One sample's output as it streams in: token ids, text, logprobs and why it ended.

The offline ``pagoda.LLM`` and the gateway both turn the scheduler's per-step tokens
into text through this class, so the two can never disagree on what a sample's text is:
tokens are detokenized incrementally (no broken UTF-8 is ever shown), stop strings are
matched on the text (the matched sample finishes with reason "stop"; its siblings go
on), and text held back for a possible stop string is released when the sample ends
for another reason. ``take_delta`` hands out what was added since the last call, for
streaming. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagoda.sampling_params import SamplingParams
from pagoda.text.detokenizer import IncrementalDetokenizer
from pagoda.text.stop import StopChecker
from pagoda.text.tokenizer import Tokenizer
from pagoda.v1 import common_pb2

# The wire's finish reasons as vLLM and OpenAI name them.
FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass
class _Text:
    """The text side of a sample: detokenizer, optional stop strings, text so far."""

    detokenizer: IncrementalDetokenizer
    stops: StopChecker | None
    text: str = ""


@dataclass(frozen=True)
class SampleDelta:
    """What one sample added since the previous ``take_delta``."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs]
    # Set once, on the delta that reports the end of the sample.
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class SampleStream:
    """Sample ``index`` of one request. Without a tokenizer it keeps token ids only."""

    index: int
    text_state: _Text | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # How much of the output ``take_delta`` has handed out.
    _shown_text: int = 0
    _shown_tokens: int = 0
    _shown_logprobs: int = 0
    _finish_reported: bool = False

    @classmethod
    def start(
        cls,
        index: int,
        tokenizer: Tokenizer | None,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> SampleStream:
        """A fresh sample of a request whose prompt is ``prompt_token_ids``; token ids
        only without a tokenizer or with ``detokenize=False``."""
        if tokenizer is None or not params.detokenize:
            return cls(index, None)
        detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        stops = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        return cls(index, _Text(detokenizer, stops))

    @property
    def text(self) -> str:
        """The text shown so far (all of it once the sample has finished)."""
        return self.text_state.text if self.text_state is not None else ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int) -> str | None:
        """Append a token and its text; returns the stop string it completed, if any.

        The caller then finishes the sample (``finish("stop", matched)``) and tells the
        scheduler. A token that arrives after the sample finished (the scheduler had
        already produced it) is dropped.
        """
        if self.finish_reason is not None:
            return None
        self.token_ids.append(token)
        state = self.text_state
        if state is None:
            return None
        delta = state.detokenizer.push([token])
        if state.stops is None:
            state.text += delta
            return None
        state.text += state.stops.push(delta)
        return state.stops.matched

    def add_logprobs(self, entries: Iterable[common_pb2.TokenLogprobs]) -> None:
        """Logprobs of tokens already added; one entry per token, extra ones are dropped
        (they belong to tokens that arrived after the sample finished)."""
        for entry in entries:
            if len(self.logprobs) >= len(self.token_ids):
                return
            self.logprobs.append(entry)

    def finish(self, reason: str, stop: int | str | None) -> None:
        """End the sample; text held back for a possible stop string is released."""
        self.finish_reason = reason
        self.stop_reason = stop
        state = self.text_state
        if state is None or isinstance(stop, str):
            return
        tail = state.detokenizer.flush()
        if state.stops is None:
            state.text += tail
        else:
            state.text += state.stops.push(tail) + state.stops.flush()

    def take_delta(self) -> SampleDelta | None:
        """What was added since the last call, or None when nothing was."""
        text = self.text
        report_finish = self.finish_reason is not None and not self._finish_reported
        if (
            len(text) == self._shown_text
            and len(self.token_ids) == self._shown_tokens
            and len(self.logprobs) == self._shown_logprobs
            and not report_finish
        ):
            return None
        delta = SampleDelta(
            index=self.index,
            text=text[self._shown_text :],
            token_ids=self.token_ids[self._shown_tokens :],
            logprobs=self.logprobs[self._shown_logprobs :],
            finish_reason=self.finish_reason if report_finish else None,
            stop_reason=self.stop_reason if report_finish else None,
        )
        self._shown_text = len(text)
        self._shown_tokens = len(self.token_ids)
        self._shown_logprobs = len(self.logprobs)
        self._finish_reported = self._finish_reported or report_finish
        return delta
