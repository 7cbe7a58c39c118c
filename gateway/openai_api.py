"""The OpenAI-compatible REST API (FastAPI): completions, chat completions, models,
tokenize / detokenize, the probes ``/health``, ``/ready``, ``/metrics``, and the API's
OpenAPI document at ``/openapi.json`` (browsed at ``/docs``).

Every error leaves as OpenAI's ``{"error": {...}}`` body, FastAPI's and Starlette's
own included (validation, unknown route, wrong method). Bodies are parsed here rather
than by FastAPI, so that bad JSON, invalid UTF-8 and type errors all become a 400 that
names the offending parameter, whatever the Content-Type; each route names its request
and answer models for the document (gateway/openapi.py). See docs/gateway.md.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import errors, openapi
from gateway import response_models as answers
from gateway.asgi import BodyLimit, ClientGone, CountResponses, EventStream, sse, until_disconnected
from gateway.core import Gateway, Prompt
from gateway.errors import GatewayError
from gateway.openai_calls import Call, chat_call, chat_messages, completion_call
from gateway.openai_format import ChatFormatter, Formatter
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from gateway.requests import RequestGroup

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Paths that need the API key (when one is set) and whose answers are counted.
API_PATHS = ("/v1/", "/tokenize", "/detokenize")


@dataclass(frozen=True)
class HttpSettings:
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024


def build_app(core: Gateway, settings: HttpSettings = HttpSettings()) -> FastAPI:
    """The FastAPI app of one gateway, wrapped in the body limit and the counters."""
    # /openapi.json and /docs need no API key, as in vLLM: the document holds no secret.
    app = FastAPI(
        title="pagoda gateway",
        version=_version(),
        description="OpenAI-compatible REST API (completions, chat completions, models) "
        "with vLLM's extensions.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _install_error_handlers(app)
    _add_probe_routes(app, core)
    _add_api_routes(app, core, settings)
    with_key = bool(settings.api_key)
    app.openapi = lambda: openapi.document(app, API_PATHS, with_key)  # type: ignore[method-assign]
    app.add_middleware(
        CountResponses, count=lambda s: core.metrics.answered("rest", s), paths=API_PATHS
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("pagoda")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# -- errors ------------------------------------------------------------------------------


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        error = GatewayError(exc.status_code, message)
        response = error_response(error)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return error_response(errors.internal())


def _from_validation(problems: list[Any]) -> GatewayError:
    """A pydantic error as a 400 naming the first offending parameter."""
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return errors.invalid(f"the body is not valid JSON: {first.get('msg', '')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "the body"
    return errors.invalid(f"{where}: {first.get('msg', 'invalid value')}", param)


async def read_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``; every way it can be wrong is a 400."""
    raw = await request.body()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.invalid(f"the body is not valid UTF-8 (byte {exc.start})") from None
    if not raw.strip():
        raise errors.invalid("the request needs a JSON body")
    try:
        # Strict, as OpenAI checks types: "2" is no integer and 1 no boolean (a number
        # may be an integer), so the server accepts exactly what /openapi.json describes.
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _from_validation(exc.errors(include_url=False)) from None


def _authorize(request: Request, settings: HttpSettings) -> None:
    key = settings.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise GatewayError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )


# -- probes ------------------------------------------------------------------------------


def _add_probe_routes(app: FastAPI, core: Gateway) -> None:
    @app.get("/health", response_class=PlainTextResponse,
             responses={200: openapi.plain_text("`ok`")})  # fmt: skip
    async def health() -> Response:
        """Liveness: answering at all means the event loop runs."""
        return PlainTextResponse("ok\n")

    @app.get("/ready", response_class=PlainTextResponse, responses={
        200: openapi.plain_text("`ready`: a session is open, enough replicas live"),
        503: openapi.plain_text("`not ready: WHY`: no session, too few live replicas, or draining"),
    })  # fmt: skip
    async def ready() -> Response:
        """Readiness: takes requests."""
        why = core.not_ready_reason()
        if why is None:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(f"not ready: {why}\n", status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: openapi.plain_text("Prometheus text")})  # fmt: skip
    async def metrics() -> Response:
        """Prometheus metrics (vLLM's names)."""
        return Response(core.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- the API -----------------------------------------------------------------------------


def _add_api_routes(app: FastAPI, core: Gateway, settings: HttpSettings) -> None:
    def described(answer: type[BaseModel], errors: tuple[int, ...], **models: Any) -> Any:
        return openapi.route(answer, errors, bool(settings.api_key), **models)

    @app.get("/v1/models", **described(answers.ModelList, ()))
    async def list_models(request: Request) -> dict[str, Any]:
        """The served model."""
        _authorize(request, settings)
        return {"object": "list", "data": [_model_card(core)]}

    @app.get("/v1/models/{model:path}", **described(answers.ModelCard, (404,)))
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        """The served model, by its name."""
        _authorize(request, settings)
        core.check_model(model)
        return _model_card(core)

    @app.post("/v1/completions", **described(
        answers.CompletionResponse, openapi.GENERATION_ERRORS, body=CompletionRequest,
        chunk=answers.CompletionChunk,
    ))  # fmt: skip
    async def completions(request: Request) -> Response:
        """Text completion; server-sent events with `"stream": true`."""
        _authorize(request, settings)
        body = await read_body(request, CompletionRequest)
        return await _serve(request, core, completion_call(core, body))

    @app.post("/v1/chat/completions", **described(
        answers.ChatCompletionResponse, openapi.GENERATION_ERRORS, body=ChatCompletionRequest,
        chunk=answers.ChatCompletionChunk,
    ))  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        """Chat completion with the model's chat template; server-sent events with
        `"stream": true`."""
        _authorize(request, settings)
        body = await read_body(request, ChatCompletionRequest)
        return await _serve(request, core, chat_call(core, body))

    @app.post("/tokenize", **described(
        answers.TokenizeResponse, openapi.BODY_ERRORS, body=TokenizeRequest
    ))  # fmt: skip
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's: a prompt, or messages rendered by the chat template, as token ids."""
        _authorize(request, settings)
        return _tokenize(core, await read_body(request, TokenizeRequest))

    @app.post("/detokenize", **described(
        answers.DetokenizeResponse, openapi.BODY_ERRORS, body=DetokenizeRequest
    ))  # fmt: skip
    async def detokenize(request: Request) -> dict[str, Any]:
        """vLLM's: token ids as text."""
        _authorize(request, settings)
        body = await read_body(request, DetokenizeRequest)
        core.check_model(body.model)
        core.check_prompt(Prompt(body.tokens) if body.tokens else Prompt([0]), "tokens")
        return {"prompt": core.tokenizer.decode(body.tokens)}


def _model_card(core: Gateway) -> dict[str, Any]:
    return {
        "id": core.model_name,
        "object": "model",
        "created": core.started,
        "owned_by": "pagoda",
        "root": core.model_name,
        "parent": None,
        "max_model_len": core.max_model_len,
    }


def _tokenize(core: Gateway, body: TokenizeRequest) -> dict[str, Any]:
    core.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise errors.invalid("give exactly one of 'prompt' and 'messages'", "prompt")
    if body.messages is not None:
        text = core.render_chat(
            chat_messages(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs,
        )
        ids = core.encode(text, bool(body.add_special_tokens))
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = core.encode(body.prompt or "", special)
    answer: dict[str, Any] = {
        "count": len(ids),
        "max_model_len": core.max_model_len,
        "tokens": ids,
        "token_strs": None,
    }
    if body.return_token_strs:
        answer["token_strs"] = core.tokenizer.convert_ids_to_tokens(ids)
    return answer


# -- answering ---------------------------------------------------------------------------


async def _serve(request: Request, core: Gateway, call: Call) -> Response:
    """Submit the call and answer it, whole or as a stream. A client that goes away
    while waiting aborts the request (499 in the access log, nobody to read it)."""
    group = core.submit(call.prompts, call.params, call.options)
    if call.stream:
        return await _start_stream(request, core, group, call.formatter)
    try:
        await until_disconnected(request, group.wait())
        return JSONResponse(call.formatter.response(group))
    except ClientGone:
        return Response(status_code=499)
    finally:
        core.release(group)


async def _start_stream(
    request: Request, core: Gateway, group: RequestGroup, formatter: Formatter
) -> Response:
    """Wait for the first output before answering, so a refusal (429, 503, 400) still
    gets its status; then stream the rest as server-sent events."""
    deltas = group.deltas()
    try:
        first = await until_disconnected(request, anext(deltas, None))
    except ClientGone:
        core.release(group)
        return Response(status_code=499)
    except BaseException:
        core.release(group)
        raise
    return EventStream(_events(core, group, formatter, first, deltas))


async def _events(
    core: Gateway,
    group: RequestGroup,
    formatter: Formatter,
    first: list[Any] | None,
    deltas: AsyncIterator[list[Any]],
) -> AsyncIterator[str]:
    started: set[int] = set()
    try:
        if isinstance(formatter, ChatFormatter):
            yield sse(formatter.role_chunk(group))
        if first is not None:
            if (chunk := formatter.chunk(group, first, started)) is not None:
                yield sse(chunk)
            async for batch in deltas:
                if (chunk := formatter.chunk(group, batch, started)) is not None:
                    yield sse(chunk)
        if formatter.include_usage:
            yield sse(formatter.usage_chunk(group))
        yield "data: [DONE]\n\n"
    except GatewayError as exc:
        yield sse(exc.body())  # the status line has gone out: report in the stream, then end
    finally:
        core.release(group)
