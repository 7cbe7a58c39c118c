"""Request bodies of the OpenAI-compatible REST API, as pydantic models.

Field names, types and defaults follow OpenAI's API and vLLM's extensions to it
(``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``,
``min_tokens``, ``include_stop_str_in_output``, ``skip_special_tokens``, ...). Only
types are checked here; value ranges are ``SamplingParams``' job, so the REST API, the
gRPC API and the offline engine accept exactly the same values. The ranges are still
stated in the JSON schema of each field (``ranged``), for ``/openapi.json``: a value
outside them is refused (the fuzzer of tests/e2e/test_fuzz.py checks that). Unknown
fields are ignored, as vLLM ignores them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32_MAX = 2**32 - 1
TOKEN_ID = {"type": "integer", "minimum": 0}
TEXT = {"type": "string", "minLength": 1}
# Submit.deadline_unix_ms (uint64 ms) must hold arrival + timeout, so a longer timeout
# (3e7 years) cannot be sent.
MAX_TIMEOUT_S = 1e15


def ranged(default: Any, **keywords: Any) -> Any:
    """A field whose range SamplingParams (or the call) checks: the range is written
    into the field's JSON schema only, so one validator decides for every API."""
    return Field(default, json_schema_extra=keywords)


# A prompt: text, texts, token ids, or lists of token ids; none of them empty.
PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema(
        {
            "anyOf": [
                TEXT,
                {"type": "array", "items": TEXT, "minItems": 1},
                {"type": "array", "items": TOKEN_ID, "minItems": 1},
                {
                    "type": "array",
                    "items": {"type": "array", "items": TOKEN_ID, "minItems": 1},
                    "minItems": 1,
                },
            ]
        }
    ),
]
StopInput = Annotated[
    str | list[str] | None,
    WithJsonSchema({"anyOf": [TEXT, {"type": "array", "items": TEXT}, {"type": "null"}]}),
]


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = ranged(1, minimum=1, maximum=1024)
    temperature: float | None = ranged(None, minimum=0)
    top_p: float | None = ranged(None, exclusiveMinimum=0, maximum=1)
    top_k: int | None = ranged(None, minimum=-1, maximum=INT32[1])
    min_p: float | None = ranged(None, minimum=0, maximum=1)
    presence_penalty: float | None = ranged(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = ranged(None, minimum=-2, maximum=2)
    repetition_penalty: float | None = ranged(None, exclusiveMinimum=0, maximum=100)
    seed: int | None = ranged(None, minimum=INT64[0], maximum=INT64[1])
    stop: StopInput = None
    stop_token_ids: list[int] | None = ranged(
        None, items={"type": "integer", "minimum": 0, "maximum": UINT32_MAX}
    )
    # Keys are token ids (checked by the call), values biases in [-100, 100].
    logit_bias: dict[str, float] | None = ranged(
        None, additionalProperties={"type": "number", "minimum": -100, "maximum": 100}
    )
    ignore_eos: bool = False
    min_tokens: int = ranged(0, minimum=0, maximum=UINT32_MAX)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = ranged(0, minimum=INT32[0], maximum=INT32[1])
    # An extension: seconds the request may take from its arrival (> 0); past it the
    # request is aborted and answered 504. OpenAI's clients send it through extra_body.
    timeout: float | None = ranged(None, exclusiveMinimum=0, maximum=MAX_TIMEOUT_S)
    cache_salt: str | None = None
    # Structured output is not enforced yet: only {"type": "text"} is accepted.
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: PromptInput
    max_tokens: int | None = ranged(16, minimum=1, maximum=UINT32_MAX)
    logprobs: int | None = ranged(None, minimum=0, maximum=20)
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
    # No range stated: max_completion_tokens, when set, wins and max_tokens is not read.
    max_tokens: int | None = None
    max_completion_tokens: int | None = ranged(None, minimum=1, maximum=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = ranged(None, minimum=0, maximum=20)
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

    # Exactly one of the two, as the route checks; the schema says so, so that clients
    # and fuzzers built from it send what is accepted.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"],
                 "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
                {"required": ["messages"],
                 "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
            ]
        },
    )  # fmt: skip

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
    tokens: list[int] = Field(json_schema_extra={"items": TOKEN_ID})
