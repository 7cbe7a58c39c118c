"""Request bodies of the OpenAI-compatible REST API, as pydantic models.

Field names, types and defaults follow OpenAI's API and vLLM's extensions to it
(``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``,
``min_tokens``, ``include_stop_str_in_output``, ``skip_special_tokens``, ...). Only
types are checked here; value ranges are ``SamplingParams``' job, so the REST API, the
gRPC API and the offline engine accept exactly the same values. Unknown fields are
ignored, as vLLM ignores them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = 0
    # An extension: seconds the request may take from its arrival (> 0); past it the
    # request is aborted and answered 504. OpenAI's clients send it through extra_body.
    timeout: float | None = None
    cache_salt: str | None = None
    # Structured output is not enforced yet: only {"type": "text"} is accepted.
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TextPart(BaseModel):
    """A content part of a chat message; only text parts are understood."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


# The roles OpenAI accepts; any other is a 400, as there.
Role = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(Role)


class ChatMessage(BaseModel):
    """One message; extra fields (``tool_calls``, ``reasoning_content``, ...) reach the
    chat template unchanged. A tool message names the call it answers."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_needs_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs a tool_call_id")
        return self


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    # Tools reach the chat template; calls are not parsed out of the output, so only
    # tool_choice "none" (or unset) is accepted.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a prompt, or messages to render with the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
