"""OpenAI request bodies turned into calls: prompts, ``SamplingParams`` and the
formatter of the answer.

Completions take a string, strings, token ids or lists of them; chat renders its
messages with the card's chat template. Unset sampling fields take ``SamplingParams``'
(vLLM's) defaults, and every value is validated there; a ``ValueError`` becomes a 400
naming the parameter as the client spelled it (``top_logprobs``,
``max_completion_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.core import Gateway, Prompt, SubmitOptions
from gateway.errors import GatewayError
from gateway.openai_format import ChatFormatter, CompletionFormatter
from gateway.protocol import (
    MAX_TIMEOUT_S,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)
from pagoda.sampling_params import SamplingParams


@dataclass
class Call:
    """A validated generation call: what to submit and how to answer."""

    prompts: list[Prompt]
    params: SamplingParams
    options: SubmitOptions
    stream: bool
    formatter: CompletionFormatter | ChatFormatter


def completion_call(core: Gateway, body: CompletionRequest) -> Call:
    core.check_model(body.model)
    if body.suffix:
        raise errors.invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise errors.invalid("best_of is not supported (it must equal n)", "best_of")
    prompts = _completion_prompts(core, body)
    params = _params(
        core,
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
    )
    core.check_context(prompts, params.max_tokens)
    formatter = CompletionFormatter(
        model=core.model_name,
        n=params.n,
        token_text=core.token_text,
        logprobs=body.logprobs,
        echo_texts=[_prompt_text(core, p) for p in prompts] if body.echo else (),
        **_usage_options(body),
    )
    return Call(prompts, params, _options(body), bool(body.stream), formatter)


def _completion_prompts(core: Gateway, body: CompletionRequest) -> list[Prompt]:
    """A string, a list of strings, token ids, or a list of token-id lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [core.text_prompt(prompt, body.add_special_tokens)]
    if not prompt:
        raise errors.invalid("the prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [core.token_prompt(prompt)]  # type: ignore[arg-type]
    if isinstance(prompt[0], str):
        return [core.text_prompt(p, body.add_special_tokens) for p in prompt]  # type: ignore[arg-type]
    return [core.token_prompt(p) for p in prompt]  # type: ignore[arg-type]


def _prompt_text(core: Gateway, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return core.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)


def chat_call(core: Gateway, body: ChatCompletionRequest) -> Call:
    core.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.tool_choice not in (None, "none"):
        raise errors.invalid(
            "tool calling is not supported: tools reach the chat template, but tool_choice "
            "must be 'none'",
            "tool_choice",
        )
    text = core.render_chat(
        chat_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools,
        template_kwargs=body.chat_template_kwargs,
    )
    prompt = core.chat_prompt(text, body.add_special_tokens)
    top = body.top_logprobs or 0
    newer = body.max_completion_tokens is not None
    params = _params(
        core,
        body,
        max_tokens=body.max_completion_tokens if newer else body.max_tokens,
        logprobs=top if body.logprobs else None,
        rename={"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"}
        if newer
        else {"logprobs": "top_logprobs"},
    )
    # Named as the client spelled it: max_completion_tokens, or the deprecated max_tokens.
    core.check_context(
        [prompt], params.max_tokens, "max_completion_tokens" if newer else "max_tokens"
    )
    formatter = ChatFormatter(
        model=core.model_name,
        n=params.n,
        token_text=core.token_text,
        logprobs=body.logprobs,
        top_logprobs=top,
        **_usage_options(body),
    )
    return Call([prompt], params, _options(body), bool(body.stream), formatter)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the template; text parts of a content list are joined by newlines."""
    out = []
    for i, message in enumerate(messages):
        plain = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            parts = []
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise errors.invalid(
                        f"messages[{i}]: content parts of type {part.type!r} are not supported",
                        "messages",
                    )
                parts.append(part.text)
            plain["content"] = "\n".join(parts)
        out.append(plain)
    return out


def _params(
    core: Gateway,
    body: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    rename: dict[str, str] | None = None,
) -> SamplingParams:
    """SamplingParams from a body: unset fields take SamplingParams' (vLLM's) defaults."""
    if body.stream_options is not None and not body.stream:
        raise errors.invalid("stream_options needs stream set to true", "stream_options")
    if body.response_format and body.response_format.get("type") != "text":
        raise errors.invalid(
            "structured output (response_format other than text) is not supported yet",
            "response_format",
        )
    kwargs: dict[str, Any] = {
        "n": body.n,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "max_tokens": max_tokens,
        "min_tokens": body.min_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "seed": body.seed,
        "logit_bias": _logit_bias(body.logit_bias),
        "skip_special_tokens": body.skip_special_tokens,
        "spaces_between_special_tokens": body.spaces_between_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(body, name)
        if value is not None:
            kwargs[name] = value
    try:
        return core.sampling_params(**kwargs)
    except GatewayError as exc:
        if exc.param and rename and exc.param in rename:
            exc.param = rename[exc.param]
        raise


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys, so as strings."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise errors.invalid(
                f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
            ) from None
        out[token] = value
    return out


# Submit.priority is an int32 on the wire.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def _options(body: SamplingRequest) -> SubmitOptions:
    low, high = PRIORITY_RANGE
    if not low <= body.priority <= high:
        raise errors.invalid(f"priority must lie in [{low}, {high}]", "priority")
    timeout = body.timeout
    if timeout is not None and not (0 < timeout <= MAX_TIMEOUT_S):
        raise errors.invalid(
            f"timeout must be a positive number of seconds, at most {MAX_TIMEOUT_S:g}", "timeout"
        )
    return SubmitOptions(
        priority=body.priority, timeout_s=timeout, cache_salt=body.cache_salt or ""
    )


def _usage_options(body: SamplingRequest) -> dict[str, bool]:
    options = body.stream_options
    return {
        "include_usage": bool(options and options.include_usage),
        "continuous_usage": bool(
            options and options.include_usage and options.continuous_usage_stats
        ),
    }
