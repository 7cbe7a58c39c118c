"""The JSON of OpenAI's completion and chat-completion answers, whole and streamed.

One ``Formatter`` per API call knows the call's id, model and options and turns the
request group's state (or a batch of sample deltas) into OpenAI's shapes, with vLLM's
additions (``stop_reason``). Choices are numbered ``prompt * n + sample`` as vLLM
numbers them for a list of prompts. Logprobs take OpenAI's two shapes: the legacy
completions one (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)
and the chat one (``content: [{token, logprob, bytes, top_logprobs}]``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.requests import ActiveRequest, RequestGroup
from pagoda.text import SampleDelta
from pagoda.v1 import common_pb2

# JSON has no -inf: vLLM reports the logprob of an impossible token as -9999.
_MIN_LOGPROB = -9999.0

TokenText = Callable[[int], str]


def _logprob(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB


def usage(group: RequestGroup) -> dict[str, Any]:
    prompt = sum(len(r.prompt_token_ids) for r in group.requests)
    completion = sum(r.completion_tokens for r in group.requests)
    cached = sum(r.num_cached_tokens for r in group.requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def stop_reason(request: ActiveRequest, reason: int | str | None) -> int | str | None:
    """vLLM's ``stop_reason``: the stop string or stop_token_ids entry; None for EOS."""
    if isinstance(reason, int) and reason not in request.params.stop_token_ids:
        return None
    return reason


@dataclass
class Formatter:
    """What completions and chat share."""

    model: str
    n: int
    token_text: TokenText
    include_usage: bool = False
    continuous_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    prefix = "cmpl"

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.prefix}-{uuid.uuid4().hex}"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def response(self, group: RequestGroup) -> dict[str, Any]:
        """The whole answer, once every sample has finished."""
        raise NotImplementedError

    def chunk(
        self, group: RequestGroup, batch: list[tuple[int, SampleDelta]], started: set[int]
    ) -> dict[str, Any] | None:
        """One streamed chunk for a batch of deltas; None when it would say nothing.
        ``started`` holds the choices that have had a chunk already."""
        raise NotImplementedError

    def usage_chunk(self, group: RequestGroup) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = usage(group)
        return chunk

    chunk_object = "text_completion"

    def _finish_chunk(self, chunk: dict[str, Any], group: RequestGroup) -> dict[str, Any]:
        if self.include_usage:
            chunk["usage"] = usage(group) if self.continuous_usage else None
        return chunk


@dataclass
class CompletionFormatter(Formatter):
    """``text_completion`` objects; ``echo`` puts each prompt's text before its output."""

    logprobs: int | None = None
    echo_texts: Sequence[str] = ()

    def response(self, group: RequestGroup) -> dict[str, Any]:
        choices = []
        for p, request in enumerate(group.requests):
            for sample in request.samples:
                text, lps = sample.text, None
                if self.logprobs is not None:
                    lps = self._logprobs(sample.token_ids, sample.logprobs, len(self._echo(p)))
                if self.echo_texts:
                    text = self._echo(p) + text
                    if lps is not None:
                        lps = _join(self._prompt_logprobs(request), lps)
                choices.append(
                    {
                        "index": p * self.n + sample.index,
                        "text": text,
                        "logprobs": lps,
                        "finish_reason": sample.finish_reason,
                        "stop_reason": stop_reason(request, sample.stop_reason),
                    }
                )
        body = self._envelope("text_completion", choices)
        body["usage"] = usage(group)
        return body

    def chunk(
        self, group: RequestGroup, batch: list[tuple[int, SampleDelta]], started: set[int]
    ) -> dict[str, Any] | None:
        choices = []
        for p, delta in batch:
            index = p * self.n + delta.index
            text, lps = delta.text, None
            request = group.requests[p]
            offset = 0
            if self.echo_texts and index not in started:
                text = self._echo(p) + text
                offset = len(self._echo(p))
            if self.logprobs is not None and (delta.token_ids or index not in started):
                lps = self._logprobs(delta.token_ids, delta.logprobs, offset)
                if self.echo_texts and index not in started:
                    lps = _join(self._prompt_logprobs(request), lps)
            started.add(index)
            if not text and lps is None and delta.finish_reason is None:
                continue
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": lps,
                    "finish_reason": delta.finish_reason,
                    "stop_reason": stop_reason(request, delta.stop_reason),
                }
            )
        if not choices:
            return None
        return self._finish_chunk(self._envelope("text_completion", choices), group)

    def _echo(self, p: int) -> str:
        return self.echo_texts[p] if self.echo_texts else ""

    def _logprobs(
        self,
        token_ids: Sequence[int],
        entries: Sequence[common_pb2.TokenLogprobs],
        offset: int,
    ) -> dict[str, list[Any]]:
        tokens = [self.token_text(t) for t in token_ids[: len(entries)]]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": [self._top(e) for e in entries],
            "text_offset": offsets,
        }

    def _top(self, entry: common_pb2.TokenLogprobs) -> dict[str, float]:
        """The top ``logprobs`` tokens and the chosen one (vLLM adds it when it is not
        among them)."""
        top = {}
        for token, value in zip(entry.top_token_ids, entry.top_logprobs, strict=False):
            top.setdefault(self.token_text(token), _logprob(value))
        top.setdefault(self.token_text(entry.token_id), _logprob(entry.logprob))
        return top

    def _prompt_logprobs(self, request: ActiveRequest) -> dict[str, list[Any]]:
        """The prompt's tokens; the first has no logprob (nothing predicts it)."""
        ids = request.prompt_token_ids
        entries = request.prompt_logprobs[: len(ids) - 1]
        tokens = [self.token_text(t) for t in ids]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        missing = len(ids) - 1 - len(entries)
        return {
            "tokens": tokens,
            "token_logprobs": [None] + [_logprob(e.logprob) for e in entries] + [None] * missing,
            "top_logprobs": [None] + [self._top(e) for e in entries] + [None] * missing,
            "text_offset": offsets,
        }


def _join(first: dict[str, list[Any]], second: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: first[key] + second[key] for key in first}


@dataclass
class ChatFormatter(Formatter):
    """``chat.completion`` objects; ``top_logprobs`` alternatives when logprobs are on."""

    logprobs: bool = False
    top_logprobs: int = 0

    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def response(self, group: RequestGroup) -> dict[str, Any]:
        choices = []
        for p, request in enumerate(group.requests):
            for sample in request.samples:
                choices.append(
                    {
                        "index": p * self.n + sample.index,
                        "message": {"role": "assistant", "content": sample.text},
                        "logprobs": self._logprobs(sample.token_ids, sample.logprobs),
                        "finish_reason": sample.finish_reason,
                        "stop_reason": stop_reason(request, sample.stop_reason),
                    }
                )
        body = self._envelope("chat.completion", choices)
        body["usage"] = usage(group)
        return body

    def role_chunk(self, group: RequestGroup) -> dict[str, Any]:
        """The first chunk: every choice opens with the assistant role."""
        choices = [
            {
                "index": p * self.n + sample.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for p, request in enumerate(group.requests)
            for sample in request.samples
        ]
        return self._finish_chunk(self._envelope(self.chunk_object, choices), group)

    def chunk(
        self, group: RequestGroup, batch: list[tuple[int, SampleDelta]], started: set[int]
    ) -> dict[str, Any] | None:
        choices = []
        for p, delta in batch:
            lps = self._logprobs(delta.token_ids, delta.logprobs) if delta.token_ids else None
            if not delta.text and lps is None and delta.finish_reason is None:
                continue
            choices.append(
                {
                    "index": p * self.n + delta.index,
                    "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": lps,
                    "finish_reason": delta.finish_reason,
                    "stop_reason": stop_reason(group.requests[p], delta.stop_reason),
                }
            )
        if not choices:
            return None
        return self._finish_chunk(self._envelope(self.chunk_object, choices), group)

    def _logprobs(
        self, token_ids: Sequence[int], entries: Sequence[common_pb2.TokenLogprobs]
    ) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for entry in entries[: len(token_ids)]:
            tops = zip(entry.top_token_ids, entry.top_logprobs, strict=False)
            content.append(
                {
                    **self._token(entry.token_id, entry.logprob),
                    "top_logprobs": [self._token(t, v) for t, v in list(tops)[: self.top_logprobs]],
                }
            )
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}
