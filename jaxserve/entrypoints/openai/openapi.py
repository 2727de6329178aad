"""`GET /openapi.json`: an OpenAPI 3.1 document of the server, generated from its pydantic
models (`protocol.py`'s requests and responses, and the small response models below for
the routes that answer with plain JSON), for client generators and schema fuzzers.

The component schemas come from pydantic (`models_json_schema`, refs under
`#/components/schemas/`); the paths list each route with its request body, its 200 body
(JSON, or an SSE stream of chunks when `stream` is true) and the OpenAI error body of 4xx
and 5xx answers. A test validates live answers against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jaxserve.entrypoints.openai import protocol

REF = "#/components/schemas/{model}"


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[Any]


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# (method, path, summary, request model or None, 200 model or None (plain text), streams)
ROUTES = (
    ("post", "/v1/completions", "Text completion", protocol.CompletionRequest,
     protocol.CompletionResponse, True),
    ("post", "/v1/chat/completions", "Chat completion", protocol.ChatCompletionRequest,
     protocol.ChatCompletionResponse, True),
    ("get", "/v1/models", "The served models", None, ModelList, False),
    ("post", "/tokenize", "Token ids of a prompt or a chat", protocol.TokenizeRequest,
     TokenizeResponse, False),
    ("post", "/detokenize", "Text of token ids", protocol.DetokenizeRequest,
     DetokenizeResponse, False),
    ("get", "/health", "200 while the engine runs, 503 once it died", None, None, False),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None, False),
    ("get", "/version", "The jaxserve version", None, VersionResponse, False),
)


def openapi_document(version: str, *, max_n: int | None = None,
                     max_logprobs: int | None = None) -> dict:
    """The document; `max_n` / `max_logprobs`: this server's limits (values past them are
    400s), stated as the request fields' maximums so that clients and fuzzers see them."""
    models = {ErrorResponse, protocol.ChatCompletionChunk}
    for _, _, _, request, response, _ in ROUTES:
        models |= {m for m in (request, response) if m is not None}
    modes = [(m, "validation" if m in _requests() else "serialization")
             for m in sorted(models, key=lambda m: m.__name__)]
    _, schemas = models_json_schema(modes, ref_template=REF)
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        fields = schemas["$defs"][request]["properties"]
        _bound(fields["n"], 1, max_n)
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            if name in fields:
                _bound(fields[name], 0, max_logprobs)
    paths: dict[str, dict] = {}
    for method, path, summary, request, response, streams in ROUTES:
        operation: dict[str, Any] = {"summary": summary, "operationId": _operation_id(path),
                                     "responses": _responses(response, streams)}
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _ref(request)}}}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxserve", "version": version,
                 "description": "OpenAI-compatible LLM serving on JAX/XLA"},
        "paths": paths,
        "components": {"schemas": schemas["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],  # the key only when the server has one
    }


def _bound(field: dict, low: int, high: int | None) -> None:
    """Sets the range of an integer field (the integer branch of an `int | None` one)."""
    for schema in field.get("anyOf", [field]):
        if schema.get("type") == "integer":
            schema["minimum"] = low
            if high is not None:
                schema["maximum"] = high


def _requests() -> set[type[BaseModel]]:
    return {request for _, _, _, request, _, _ in ROUTES if request is not None}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _operation_id(path: str) -> str:
    return path.strip("/").replace("/", "_").replace(".", "_") or "root"


def _responses(response: type[BaseModel] | None, streams: bool) -> dict:
    ok: dict[str, Any] = {"description": "OK"}
    if response is None:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    else:
        ok["content"] = {"application/json": {"schema": _ref(response)}}
        if streams:
            chunk = protocol.ChatCompletionChunk if "Chat" in response.__name__ else response
            # one server-sent event (OpenAPI 3.2's event shape, which fuzzers check each
            # event against); its data is a chunk, an in-band error body or [DONE]
            ok["content"]["text/event-stream"] = {"schema": {
                "type": "object", "required": ["data"], "properties": {"data": {
                    "type": "string", "description": f"a {chunk.__name__} as JSON, then "
                    "[DONE] (with `stream: true`); an error after the start is an "
                    "ErrorResponse before [DONE]"}}}}
    error = {"content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return {"200": ok,
            "400": {"description": "Invalid request (the OpenAI error body)", **error},
            "401": {"description": "Missing or wrong API key", **error},
            "404": {"description": "No such model or route", **error},
            "405": {"description": "Method not allowed", **error},
            "413": {"description": "Request body too large", **error},
            "503": {"description": "Engine not running or queue full", **error},
            "500": {"description": "Internal error", **error}}
