"""The OpenAPI document of the REST API (``/openapi.json``, browsed at ``/docs``).

The routes read their bodies themselves (``openai_api.read_body``), so FastAPI knows
neither their request nor their answer models. Each route states them through
``route``: ``openapi_extra`` for the request body and ``responses`` for the answers,
as references to ``#/components/schemas``, which ``document`` fills from the pydantic
models of gateway/protocol.py and gateway/response_models.py. The errors listed are the
ones the route can really answer (gateway/errors.py); FastAPI's own 422 is dropped,
since a validation error is a 400 here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway import protocol, response_models

REF = "#/components/schemas/{model}"
BEARER = "bearer"
# The last event of a stream that ended well.
DONE = "[DONE]"

REQUESTS: tuple[type[BaseModel], ...] = (
    protocol.CompletionRequest,
    protocol.ChatCompletionRequest,
    protocol.TokenizeRequest,
    protocol.DetokenizeRequest,
)
ANSWERS: tuple[type[BaseModel], ...] = (
    response_models.ErrorResponse,
    response_models.CompletionResponse,
    response_models.CompletionChunk,
    response_models.ChatCompletionResponse,
    response_models.ChatCompletionChunk,
    response_models.ModelList,
    response_models.ModelCard,
    response_models.TokenizeResponse,
    response_models.DetokenizeResponse,
)

# What each error status means, as the routes' documentation says it.
ERRORS = {
    400: "a bad request: bad JSON, invalid UTF-8, a wrong type, a missing field, a value "
    "out of range, an empty or too long prompt; `param` names the field",
    401: "a missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "an unknown model (`model_not_found`)",
    413: "a body over `--max-body-bytes`",
    429: "the scheduler's queue is full; see `Retry-After`",
    500: "a sequence failed inside pagoda",
    503: "no session to the scheduler, draining, or a stalled engine; see `Retry-After`",
    504: "the request's deadline passed (`deadline_exceeded`)",
}
# The errors of a body that is read, and of a call that generates.
BODY_ERRORS = (400, 404, 413)
GENERATION_ERRORS = (*BODY_ERRORS, 429, 500, 503, 504)


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": ref(model)}}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is ``model``."""
    return {"requestBody": {"required": True, "content": json_content(model)}}


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """A ``text/event-stream`` answer: ``data: <chunk JSON>`` events, then ``data: [DONE]``.
    A failure after the first event is one ``data: <ErrorResponse>`` event and no
    ``[DONE]``. OpenAPI 3.1 has no keyword for one event of a stream, so ``schema``
    describes one event (as OpenAPI 3.2's ``itemSchema`` does, and as schemathesis
    reads a 3.1 event stream), its JSON ``data`` typed by ``contentSchema``."""
    payload = {"anyOf": [ref(chunk), ref(response_models.ErrorResponse)]}
    data = {
        "anyOf": [
            {"const": DONE},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    event = {
        "type": "object",
        "description": f"one server-sent event: `data: <{chunk.__name__}>`, or "
        f"`data: <ErrorResponse>` as the last event of a failed stream, or `data: {DONE}`",
        "properties": {"data": data},
        "required": ["data"],
    }
    return {"text/event-stream": {"schema": event}}


def answers(
    ok: dict[str, Any], errors: tuple[int, ...], api_key: bool, what: str = "the answer"
) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route: 200 with ``ok`` content, and each error status with
    OpenAI's error body (401 too when an API key is set)."""
    statuses = sorted({*errors, 401} if api_key else set(errors))
    out: dict[int | str, dict[str, Any]] = {200: {"description": what, "content": ok}}
    for status in statuses:
        out[status] = {
            "description": ERRORS[status],
            "content": json_content(response_models.ErrorResponse),
        }
    return out


def route(
    answer: type[BaseModel],
    errors: tuple[int, ...],
    api_key: bool,
    body: type[BaseModel] | None = None,
    chunk: type[BaseModel] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of a route that answers ``answer`` as JSON (or ``chunk``
    events with ``stream``) to a ``body``: its ``responses`` and ``openapi_extra``.
    ``response_model`` stays None: the answers are dicts already, not to be checked
    again on every call."""
    ok = json_content(answer)
    if chunk is not None:
        ok |= event_stream(chunk)
    return {
        "response_model": None,
        "responses": answers(ok, errors, api_key),
        "openapi_extra": request_body(body) if body is not None else None,
    }


def plain_text(what: str) -> dict[str, Any]:
    return {"description": what, "content": {"text/plain": {"schema": {"type": "string"}}}}


def document(app: FastAPI, api_paths: tuple[str, ...], api_key: bool) -> dict[str, Any]:
    """The whole document, built once per app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    _, defs = models_json_schema(
        [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in ANSWERS],
        ref_template=REF,
    )
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    if api_key:
        components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if api_key and path.startswith(api_paths):
                operation["security"] = [{BEARER: []}]
    app.openapi_schema = schema
    return schema
