"""What the REST and the gRPC API share: the model, tokenization, validation, and
submitting requests on the session.

Both APIs turn their request into (prompt token ids, ``SamplingParams``) through the
helpers here, so a prompt is checked the same way whichever door it came through, and
sampling parameters are validated by ``SamplingParams`` alone.

Deadlines are enforced here as well as sent: ``Submit.deadline_unix_ms`` lets the
scheduler drop a request that is still queued when its time is up, and a timer per
API call aborts it on the session and answers 504 even if the scheduler says nothing
(an old scheduler, a clock that differs, a request stuck behind a dead replica).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.metrics import Metrics
from gateway.requests import ActiveRequest, RequestGroup, RequestTable
from gateway.session import SessionClient
from pagoda.model_card.card import ModelCard
from pagoda.sampling_params import SamplingParams
from pagoda.text import Tokenizer
from pagoda.v1 import common_pb2, session_pb2


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to submit: its token ids, and its text when it came as text."""

    token_ids: list[int]
    text: str | None = None


@dataclass(frozen=True)
class SubmitOptions:
    """Per-request fields of ``Submit`` besides the prompt and the sampling."""

    priority: int = 0
    # Seconds the request may take, from its arrival here; None: the server's default.
    timeout_s: float | None = None
    cache_salt: str = ""
    lora_id: str = ""
    # Carried to the worker as the contract reserves it; not enforced yet.
    structured_output: common_pb2.StructuredOutput | None = None


class Gateway:
    """The model, the tokenizer, the session and the requests in flight."""

    def __init__(
        self,
        card: ModelCard,
        tokenizer: Tokenizer,
        served_model_name: str,
        session: SessionClient | None = None,
        request_timeout_s: float | None = None,
        min_ready_replicas: int = 0,
    ) -> None:
        self.card = card
        self.tokenizer = tokenizer
        self.model_name = served_model_name
        self.metrics = Metrics(served_model_name)
        self.table = RequestTable(self.metrics)
        self.metrics.track_in_flight(lambda: len(self.table))
        self.session: SessionClient | None = session
        self.draining = False
        # Applies to requests that name no deadline of their own (--request-timeout).
        self.request_timeout_s = request_timeout_s
        # /ready waits until the scheduler reports this many live replicas (0: never waits).
        self.min_ready_replicas = min_ready_replicas
        self.started = int(time.time())
        self._token_texts: dict[int, str] = {}

    # -- the session -------------------------------------------------------------------

    def attach_session(self, session: SessionClient) -> None:
        self.session = session

    def on_session_state(self, up: bool) -> None:
        """The session opened (``up``) or broke; a break fails every request in flight."""
        self.metrics.session_up.set(1 if up else 0)
        if up:
            self.table.attach(self._send)
        else:
            self.table.attach(None)
            self.table.fail_all(errors.session_lost())

    def on_load(self, load: session_pb2.SchedulerLoad | None) -> None:
        """The scheduler's load changed (None: the session ended)."""
        self.metrics.scheduler_load(load)

    def on_engine_state(self, serving: bool) -> None:
        """The scheduler's gRPC health changed: NOT_SERVING means a stalled engine."""
        self.metrics.engine_stalled.set(0 if serving else 1)

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected

    @property
    def engine_serving(self) -> bool:
        """False while the scheduler's health says NOT_SERVING. The gateway stays ready
        then: an unready gateway gets no traffic, so it could not tell clients why."""
        return self.session is None or self.session.engine_serving

    @property
    def live_replicas(self) -> int:
        """Replicas taking new work, as the scheduler last said; 0 without a session."""
        load = self.session.load if self.session is not None else None
        return load.num_live_replicas if load is not None else 0

    def ready(self) -> bool:
        """Takes requests: a session is open, the gateway is not draining, and the
        scheduler has ``min_ready_replicas`` live replicas (``pagoda serve`` sets it to
        its worker count; a pod's default 0 leaves a gateway without workers ready, so
        workers can scale to zero while requests wait in the queue)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the gateway is not ready, or None when it is."""
        if self.draining:
            return "draining"
        if not self.connected:
            return "no session to the scheduler"
        live, wanted = self.live_replicas, self.min_ready_replicas
        if live < wanted:
            return f"{live} of {wanted} worker replicas are live"
        return None

    def _send(self, message: session_pb2.GatewayMessage) -> None:
        if self.session is None:
            raise errors.no_session()
        self.session.send(message)

    # -- the model ---------------------------------------------------------------------

    @property
    def model_info(self) -> common_pb2.ModelInfo:
        """The served model as clients see it: the scheduler's view when a session is
        open (its max_model_len is authoritative), under this gateway's served name."""
        info = common_pb2.ModelInfo()
        if self.session is not None and self.session.model is not None:
            info.CopyFrom(self.session.model)
        else:
            info.CopyFrom(self.card.to_proto())
        info.name = self.model_name
        return info

    @property
    def max_model_len(self) -> int:
        return self.model_info.max_model_len or self.card.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_info.vocab_size or self.card.vocab_size

    def check_model(self, model: str | None) -> None:
        """An empty or missing model means the served one; any other name is 404."""
        if model and model != self.model_name:
            raise errors.model_not_found(model, self.model_name)

    # -- prompts -----------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """A token's own text, as logprobs show it (vLLM decodes each token alone)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_texts) < 1_000_000:
                self._token_texts[token_id] = text
        return text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def text_prompt(
        self, text: str, add_special_tokens: bool = True, param: str = "prompt"
    ) -> Prompt:
        if not text:
            raise errors.invalid("the prompt must not be empty", param)
        return self.check_prompt(Prompt(self.encode(text, add_special_tokens), text), param)

    def token_prompt(self, ids: Sequence[int], param: str = "prompt") -> Prompt:
        return self.check_prompt(Prompt([int(t) for t in ids]), param)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The conversation rendered by the card's chat template; errors are 400."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                chat_template=self.card.chat_template(),
                **dict(template_kwargs or {}),
            )
        except (ValueError, TypeError) as exc:
            raise errors.invalid(str(exc), "messages") from None

    def chat_prompt(self, text: str, add_special_tokens: bool = False) -> Prompt:
        """A rendered conversation; the template wrote its special tokens already."""
        ids = self.encode(text, add_special_tokens)
        return self.check_prompt(Prompt(ids, text), "messages")

    def check_prompt(self, prompt: Prompt, param: str = "prompt") -> Prompt:
        ids = prompt.token_ids
        if not ids:
            raise errors.invalid("the prompt must hold at least one token", param)
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if t < 0 or t >= vocab)
            raise errors.invalid(
                f"token id {bad} is out of range: the vocabulary has {vocab} tokens", param
            )
        limit = self.max_model_len
        if len(ids) > limit:
            raise errors.invalid(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {len(ids)} tokens. Please reduce the length of the prompt.",
                param,
            )
        return prompt

    def check_context(
        self, prompts: Sequence[Prompt], max_tokens: int | None, param: str = "max_tokens"
    ) -> None:
        """Prompt plus ``max_tokens`` must fit in the context, as OpenAI and vLLM demand:
        a request that cannot get what it asked for is refused, not cut short. Without
        ``max_tokens`` generation simply stops at the context limit."""
        if max_tokens is None:
            return
        limit = self.max_model_len
        for prompt in prompts:
            length = len(prompt.token_ids)
            if length + max_tokens > limit:
                raise errors.invalid(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {length + max_tokens} tokens ({length} in the messages, "
                    f"{max_tokens} in the completion). Please reduce the length of the "
                    "messages or completion.",
                    param,
                )

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        """``SamplingParams`` validation, its ``ValueError`` turned into a 400 that names
        the parameter; logit_bias token ids are checked against the vocabulary."""
        try:
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            raise errors.invalid(message, _param_of(message, kwargs)) from None
        self.check_logit_bias(params)
        return params

    def check_logit_bias(self, params: SamplingParams) -> None:
        """Token ids in logit_bias must exist (SamplingParams does not know the vocab)."""
        vocab = self.vocab_size
        for token in params.logit_bias:
            if token >= vocab:
                raise errors.invalid(
                    f"logit_bias token id {token} is out of range: the vocabulary has {vocab}",
                    "logit_bias",
                )

    # -- requests ----------------------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        options: SubmitOptions = SubmitOptions(),
    ) -> RequestGroup:
        """Queue one request per prompt at the scheduler; 503 at once without a session
        or while the scheduler's engine is stalled. The call's deadline (its own timeout,
        else the server's default) starts now."""
        if self.draining:
            raise errors.draining()
        if not self.connected:
            raise errors.no_session()
        if not self.engine_serving:
            raise errors.engine_not_serving()
        wake = asyncio.Event()
        wire_params = params.to_proto()
        group = RequestGroup([], wake)
        timeout_s = options.timeout_s if options.timeout_s is not None else self.request_timeout_s
        deadline = deadline_ms = None
        if timeout_s is not None:
            deadline = time.monotonic() + timeout_s
            deadline_ms = int((time.time() + timeout_s) * 1000)
        try:
            for prompt in prompts:
                request_id = uuid.uuid4().hex
                request = ActiveRequest.create(
                    request_id, prompt.token_ids, params, self.tokenizer, wake
                )
                request.deadline, request.timeout_s = deadline, timeout_s
                self.table.add(request)
                group.requests.append(request)
                self._send(
                    session_pb2.GatewayMessage(
                        submit=session_pb2.Submit(
                            request_id=request_id,
                            prompt_token_ids=prompt.token_ids,
                            sampling=wire_params,
                            priority=options.priority,
                            deadline_unix_ms=deadline_ms or 0,
                            cache_salt=options.cache_salt,
                            lora_id=options.lora_id,
                            structured_output=options.structured_output,
                        )
                    )
                )
        except BaseException:
            self.release(group)
            raise
        if timeout_s is not None:
            group.timer = asyncio.get_running_loop().call_later(
                timeout_s, self._expire, group, timeout_s
            )
        return group

    def _expire(self, group: RequestGroup, timeout_s: float) -> None:
        """The call's deadline passed: abort what is unfinished and fail it with 504."""
        error = errors.deadline_exceeded(timeout_s)
        for request in group.requests:
            if not request.over:
                self.table.expire(request, error)

    def release(self, group: RequestGroup) -> None:
        """The caller is done with ``group``: abort whatever is still running."""
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        for request in group.requests:
            if not request.over:
                self.table.abort(request)


# Words that begin SamplingParams' messages but name no request field.
_PARAM_ALIASES = {"stop_token_ids entry": "stop_token_ids", "logit_bias": "logit_bias"}


def _param_of(message: str, kwargs: Mapping[str, Any]) -> str | None:
    """The parameter a SamplingParams message is about: it starts with the field name."""
    for prefix, param in _PARAM_ALIASES.items():
        if message.startswith(prefix):
            return param
    word = message.split(" ", 1)[0].strip("():,")
    if word in kwargs:
        return word
    return None
