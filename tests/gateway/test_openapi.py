"""``/openapi.json`` and ``/docs``: every route with its request and answer models, and
real answers of a running gateway valid against the document's own schemas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from pagoda.model_card.card import ModelCard
from tests.gateway.conftest import MODEL_NAME
from tests.gateway.harness import GatewayProcess
from tests.gateway.scheduler_double import SchedulerDouble

LIMIT = 4096
ERROR = "ErrorResponse"
# (method, path): (request model, answer models by media type, error statuses)
ROUTES: dict[tuple[str, str], tuple[str | None, dict[str, str], set[int]]] = {
    ("post", "/v1/completions"): (
        "CompletionRequest",
        {"application/json": "CompletionResponse", "text/event-stream": "CompletionChunk"},
        {400, 404, 413, 429, 500, 503, 504},
    ),
    ("post", "/v1/chat/completions"): (
        "ChatCompletionRequest",
        {"application/json": "ChatCompletionResponse", "text/event-stream": "ChatCompletionChunk"},
        {400, 404, 413, 429, 500, 503, 504},
    ),
    ("get", "/v1/models"): (None, {"application/json": "ModelList"}, set()),
    ("get", "/v1/models/{model}"): (None, {"application/json": "ModelCard"}, {404}),
    ("post", "/tokenize"): ("TokenizeRequest", {"application/json": "TokenizeResponse"},
                            {400, 404, 413}),
    ("post", "/detokenize"): ("DetokenizeRequest", {"application/json": "DetokenizeResponse"},
                              {400, 404, 413}),
}  # fmt: skip
PROBES = {("get", "/health"), ("get", "/ready"), ("get", "/metrics")}


@pytest.fixture(scope="module")
def gateway(card: ModelCard, double: SchedulerDouble) -> Iterator[GatewayProcess]:
    process = GatewayProcess.start(Path(card.path), double.address, "--max-body-bytes", str(LIMIT))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def document(gateway: GatewayProcess) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/openapi.json")
    assert response.status_code == 200
    return response.json()


def _ref(schema: dict[str, Any]) -> str:
    return schema["$ref"].removeprefix("#/components/schemas/")


def _event_payload(event: dict[str, Any]) -> dict[str, Any]:
    """The schema of an event's JSON ``data`` (the other choice is ``[DONE]``)."""
    done, payload = event["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]"} and payload["contentMediaType"] == "application/json"
    return payload["contentSchema"]


def test_the_document_lists_every_route_with_its_request_and_answer_models(
    document: dict[str, Any],
) -> None:
    assert document["openapi"].startswith("3.1")
    listed = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert listed == set(ROUTES) | PROBES
    schemas = document["components"]["schemas"]
    for (method, path), (request, ok, errors) in ROUTES.items():
        operation = document["paths"][path][method]
        if request is None:
            assert "requestBody" not in operation, path
        else:
            body = operation["requestBody"]
            assert body["required"] is True
            assert _ref(body["content"]["application/json"]["schema"]) == request
            assert request in schemas
        responses = operation["responses"]
        assert {int(s) for s in responses} == {200} | errors, path
        content = responses["200"]["content"]
        assert set(content) == set(ok), path
        for media, model in ok.items():
            where = content[media]
            schema = where["schema"]
            if media == "text/event-stream":
                schema = _event_payload(schema)["anyOf"][0]
            assert _ref(schema) == model, (path, media)
            assert model in schemas
        for status in errors:
            error = responses[str(status)]["content"]["application/json"]["schema"]
            assert _ref(error) == ERROR, (path, status)
        assert "security" not in operation  # no API key on this gateway
    for method, path in PROBES:
        assert "text/plain" in document["paths"][path][method]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in schemas  # validation errors are 400s, not 422s


def test_the_request_models_say_what_the_server_checks(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert completion["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert schemas["DetokenizeRequest"]["required"] == ["tokens"]
    error = schemas["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert schemas[ERROR]["additionalProperties"] is False


def test_the_docs_page_loads_the_document(gateway: GatewayProcess) -> None:
    page = httpx.get(f"{gateway.url}/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/openapi.json" in page.text


def test_the_document_and_docs_need_no_api_key(card: ModelCard, double: SchedulerDouble) -> None:
    """As in vLLM; the API routes then say they need the bearer key."""
    secured = GatewayProcess.start(Path(card.path), double.address, "--api-key", "s3cret")
    try:
        secured.wait_ready()
        assert httpx.get(f"{secured.url}/docs").status_code == 200
        document = httpx.get(f"{secured.url}/openapi.json").json()
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for method, path in ROUTES:
            operation = document["paths"][path][method]
            assert operation["security"] == [{"bearer": []}], path
            assert "401" in operation["responses"], path
        for method, path in PROBES:
            assert "security" not in document["paths"][path][method]
    finally:
        assert secured.stop() == 0


class Checker:
    """Validates answers against the schema the document gives for their route,
    status and media type."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str, int, str]] = set()

    def validator(self, schema: dict[str, Any]) -> jsonschema_rs.Validator:
        root = {**schema, "components": self.document["components"]}
        return jsonschema_rs.validator_for(root)

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        status = response.status_code
        media = response.headers["content-type"].split(";")[0]
        answer = self.document["paths"][path][method]["responses"][str(status)]
        where = answer["content"][media]
        if media == "text/event-stream":
            events = _events(response.text)
            assert events, response.text
            validator = self.validator(_event_payload(where["schema"]))
            for event in events:
                validator.validate(event)
        else:
            self.validator(where["schema"]).validate(response.json())
        self.checked.add((method, path, status, media))


def _events(text: str) -> list[Any]:
    datas = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert datas[-1] == "[DONE]", datas[-1:]
    return [json.loads(d) for d in datas[:-1]]


def test_real_answers_validate_against_the_documents_models(
    gateway: GatewayProcess, document: dict[str, Any]
) -> None:
    checker = Checker(document)
    usage = {"include_usage": True, "continuous_usage_stats": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    calls: list[tuple[str, str, str, dict[str, Any] | None]] = [
        ("get", "/v1/models", "/v1/models", None),
        ("get", "/v1/models/{model}", f"/v1/models/{MODEL_NAME}", None),
        ("get", "/v1/models/{model}", "/v1/models/gpt-9", None),
        ("post", "/v1/completions", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}),
        ("post", "/v1/completions", "/v1/completions",
         {"prompt": ["Hi", "Yo"], "n": 2, "logprobs": 2, "echo": True, "max_tokens": 4,
          "stop": ["answer"]}),
        ("post", "/v1/completions", "/v1/completions",
         {"prompt": [1, 2, 3], "logprobs": 1, "echo": True, "stream": True, "n": 2,
          "max_tokens": 5, "stream_options": usage}),
        ("post", "/v1/completions", "/v1/completions", {"prompt": 5}),
        ("post", "/v1/completions", "/v1/completions", {"prompt": "Hi", "model": "gpt-9"}),
        ("post", "/v1/completions", "/v1/completions", {"prompt": "a" * LIMIT}),
        ("post", "/v1/chat/completions", "/v1/chat/completions",
         {**chat, "logprobs": True, "top_logprobs": 2, "max_tokens": 4, "n": 2}),
        ("post", "/v1/chat/completions", "/v1/chat/completions",
         {**chat, "logprobs": True, "top_logprobs": 1, "stream": True, "max_tokens": 30,
          "stop": ["42"], "stream_options": {"include_usage": True}}),
        ("post", "/v1/chat/completions", "/v1/chat/completions", {**chat, "stream": True}),
        ("post", "/v1/chat/completions", "/v1/chat/completions", {"messages": []}),
        ("post", "/tokenize", "/tokenize", {"prompt": "Hi there", "return_token_strs": True}),
        ("post", "/tokenize", "/tokenize", chat),
        ("post", "/tokenize", "/tokenize", {}),
        ("post", "/detokenize", "/detokenize", {"tokens": [70, 71, 72]}),
        ("post", "/detokenize", "/detokenize", {"tokens": "no"}),
    ]  # fmt: skip
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for method, template, path, body in calls:
            response = http.request(method.upper(), path, json=body)
            checker.check(method, template, response)
    assert {(m, p) for m, p, _, _ in checker.checked} == set(ROUTES)
    statuses = {s for _, _, s, _ in checker.checked}
    assert statuses == {200, 400, 404, 413}
    assert ("post", "/v1/chat/completions", 200, "text/event-stream") in checker.checked
    assert ("post", "/v1/completions", 200, "text/event-stream") in checker.checked
