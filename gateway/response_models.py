"""Answer bodies of the OpenAI-compatible REST API, as pydantic models.

The answers themselves are built as plain dicts (gateway/openai_format.py and the
routes); these models describe them in ``/openapi.json``, and the tests validate real
answers against that schema. Extra fields are forbidden here, so a field added to an
answer without being described fails those tests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Why a choice ended: OpenAI's "stop" and "length", and vLLM's "abort" and "error".
FinishReason = Literal["stop", "length", "abort", "error"]


class Described(BaseModel):
    """An answer body: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


# -- errors --------------------------------------------------------------------------


class ErrorDetail(Described):
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error")
    param: str | None = Field(description="the request field at fault, where there is one")
    code: str | None = Field(description="e.g. model_not_found, queue_full, deadline_exceeded")


class ErrorResponse(Described):
    """Every 4xx and 5xx answer, and the last event of a stream that failed."""

    error: ErrorDetail


# -- usage and logprobs --------------------------------------------------------------


class PromptTokensDetails(Described):
    cached_tokens: int


class Usage(Described):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(Described):
    """The legacy completions shape; a prompt's first token (with ``echo``) has none."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Described):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Described):
    content: list[ChatTokenLogprob]


# -- completions ---------------------------------------------------------------------


class CompletionChoice(Described):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = Field(
        description="the stop string or stop_token_ids entry that ended the choice"
    )


class CompletionResponse(Described):
    """``POST /v1/completions`` without ``stream``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Described):
    """One event of a completions stream. The last one (with
    ``stream_options.include_usage``) has no choices and carries the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- chat completions ----------------------------------------------------------------


class AssistantMessage(Described):
    role: Literal["assistant"]
    content: str


class ChatChoice(Described):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None


class ChatCompletionResponse(Described):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Described):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Described):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Described):
    """One event of a chat stream; the first gives every choice the assistant role."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- models, tokenize, detokenize ----------------------------------------------------


class ModelCard(Described):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(Described):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(Described):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(Described):
    prompt: str
