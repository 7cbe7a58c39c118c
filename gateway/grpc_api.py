"""The public gRPC API: ``pagoda.v1.Generation`` plus gRPC health and reflection.

It takes text, token ids or a chat conversation (so a router that tokenizes by itself
can drive pagoda directly) and shares every check with the REST API through
``gateway.core``: bad input is INVALID_ARGUMENT, an unknown model NOT_FOUND, overload
RESOURCE_EXHAUSTED (with a ``retry-after`` trailer), no scheduler UNAVAILABLE. A
cancelled RPC cancels its handler, whose ``finally`` aborts the request on the session.
The call's own gRPC deadline is the request's deadline: it travels to the scheduler and
the gateway answers DEADLINE_EXCEEDED when it passes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import errors
from gateway.core import Gateway, Prompt, SubmitOptions
from gateway.errors import GatewayError
from gateway.protocol import CHAT_ROLES
from gateway.requests import ActiveRequest, RequestGroup
from pagoda.sampling_params import SamplingParams
from pagoda.text import SampleDelta
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

GENERATION_SERVICE = api_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


class GenerationService(api_pb2_grpc.GenerationServicer):
    """``Generation`` over one gateway core."""

    def __init__(self, core: Gateway) -> None:
        self.core = core

    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        status = grpc.StatusCode.OK
        group: RequestGroup | None = None
        try:
            params, prompt = self._prepare(request)
            group = self.core.submit([prompt], params, _options(request, context))
            rid = request.request_id or group.requests[0].request_id
            sent_usage = False
            async for batch in group.deltas():
                response = api_pb2.GenerateResponse(
                    request_id=rid, choices=[_choice(request, params, d) for _, d in batch]
                )
                if group.done:
                    response.usage.CopyFrom(_usage(group.requests[0]))
                    sent_usage = True
                yield response
            if not sent_usage:
                yield api_pb2.GenerateResponse(request_id=rid, usage=_usage(group.requests[0]))
        except GatewayError as exc:
            status = exc.grpc_code
            await _abort(context, exc)
        except BaseException:
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            if group is not None:
                self.core.release(group)
            self.core.metrics.answered("grpc", status.name)

    async def Complete(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.CompleteResponse:
        async def work() -> api_pb2.CompleteResponse:
            params, prompt = self._prepare(request)
            group = self.core.submit([prompt], params, _options(request, context))
            try:
                await group.wait()
            finally:
                self.core.release(group)
            active = group.requests[0]
            return api_pb2.CompleteResponse(
                request_id=request.request_id or active.request_id,
                choices=[_whole_choice(request, active, i) for i in range(params.n)],
                usage=_usage(active),
                prompt_logprobs=active.prompt_logprobs
                if params.prompt_logprobs is not None
                else [],
            )

        return await self._unary(context, work)

    async def Tokenize(
        self, request: api_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.TokenizeResponse:
        async def work() -> api_pb2.TokenizeResponse:
            core = self.core
            core.check_model(request.model)
            kind = request.WhichOneof("input")
            if kind == "messages":
                text = _render(core, request.messages)
                ids = core.encode(text, _flag(request, "add_special_tokens", False))
            elif kind == "text":
                ids = core.encode(request.text, _flag(request, "add_special_tokens", True))
            else:
                raise errors.invalid("give 'text' or 'messages'")
            tokens = core.tokenizer.convert_ids_to_tokens(ids)
            return api_pb2.TokenizeResponse(
                token_ids=ids, tokens=[t or "" for t in tokens], max_model_len=core.max_model_len
            )

        return await self._unary(context, work)

    async def ListModels(
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        async def work() -> api_pb2.ListModelsResponse:
            return api_pb2.ListModelsResponse(models=[self.core.model_info])

        return await self._unary(context, work)

    # -- helpers -----------------------------------------------------------------------

    async def _unary(
        self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Any]]
    ) -> Any:
        status = grpc.StatusCode.OK
        try:
            return await work()
        except GatewayError as exc:
            status = exc.grpc_code
            await _abort(context, exc)
        except BaseException:
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.core.metrics.answered("grpc", status.name)

    def _prepare(self, request: api_pb2.GenerateRequest) -> tuple[SamplingParams, Prompt]:
        core = self.core
        core.check_model(request.model)
        try:
            params = SamplingParams.from_proto(request.sampling)
        except (ValueError, TypeError) as exc:
            raise errors.invalid(f"sampling: {exc}", "sampling") from None
        core.check_logit_bias(params)
        prompt = self._prompt(request)
        core.check_context([prompt], params.max_tokens)
        return params, prompt

    def _prompt(self, request: api_pb2.GenerateRequest) -> Prompt:
        core = self.core
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return core.text_prompt(request.text, _flag(request, "add_special_tokens", True))
        if kind == "token_ids":
            return core.token_prompt(request.token_ids.ids)
        if kind == "messages":
            return core.chat_prompt(_render(core, request.messages))
        raise errors.invalid("give a prompt: 'text', 'token_ids' or 'messages'", "prompt")


def _options(request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> SubmitOptions:
    """The submit options, with the call's gRPC deadline (if the client set one)."""
    remaining = context.time_remaining()
    return SubmitOptions(
        priority=request.priority,
        timeout_s=max(remaining, 1e-3) if remaining is not None else None,
        cache_salt=request.cache_salt,
        lora_id=request.lora_id,
        structured_output=request.structured_output
        if request.HasField("structured_output")
        else None,
    )


def _flag(message: Any, name: str, default: bool) -> bool:
    return getattr(message, name) if message.HasField(name) else default


def _render(core: Gateway, chat: api_pb2.ChatMessages) -> str:
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise errors.invalid(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}",
                "messages",
            )
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    return core.render_chat(
        messages, add_generation_prompt=_flag(chat, "add_generation_prompt", True)
    )


def _choice(
    request: api_pb2.GenerateRequest, params: SamplingParams, delta: SampleDelta
) -> api_pb2.Choice:
    choice = api_pb2.Choice(index=delta.index, text=delta.text)
    if request.return_token_ids or not params.detokenize:
        choice.token_ids.extend(delta.token_ids)
    if params.logprobs is not None:
        choice.logprobs.extend(delta.logprobs)
    _set_finish(choice, delta.finish_reason, delta.stop_reason)
    return choice


def _whole_choice(
    request: api_pb2.GenerateRequest, active: ActiveRequest, index: int
) -> api_pb2.Choice:
    sample = active.samples[index]
    choice = api_pb2.Choice(index=index, text=sample.text)
    if request.return_token_ids or not active.params.detokenize:
        choice.token_ids.extend(sample.token_ids)
    if active.params.logprobs is not None:
        choice.logprobs.extend(sample.logprobs)
    _set_finish(choice, sample.finish_reason, sample.stop_reason)
    return choice


def _set_finish(choice: api_pb2.Choice, reason: str | None, stop: int | str | None) -> None:
    if reason is None:
        return
    choice.finish_reason = _FINISH.get(reason, common_pb2.FINISH_REASON_NONE)
    if isinstance(stop, str):
        choice.stop_string = stop
    elif isinstance(stop, int):
        choice.stop_token_id = stop


def _usage(active: ActiveRequest) -> api_pb2.Usage:
    return api_pb2.Usage(
        prompt_tokens=len(active.prompt_token_ids),
        completion_tokens=active.completion_tokens,
        cached_tokens=active.num_cached_tokens,
    )


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError) -> None:
    if error.retry_after_s:
        context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
    await context.abort(error.grpc_code, error.message)


class Health:
    """gRPC health: SERVING while the gateway is ready (a session open, not draining)."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def update(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", GENERATION_SERVICE):
            await self.servicer.set(service, status)


def add_services(server: grpc.aio.Server, core: Gateway, health_state: Health) -> None:
    """Generation, health and reflection on ``server``."""
    api_pb2_grpc.add_GenerationServicer_to_server(GenerationService(core), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    names = (GENERATION_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
