"""GET /openapi.json: a valid OpenAPI 3.1 document, and the live answers match its schemas."""

import json
import urllib.request

import jsonschema
import openapi_spec_validator
import pytest

from jaxserve.entrypoints.openai.openapi import openapi_document

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)


@pytest.fixture(scope="module")
def document(api_server):
    with urllib.request.urlopen(api_server.url + "/openapi.json", timeout=30) as response:
        return json.loads(response.read())  # no key needed, as /health


def _validate(document: dict, body: object, model: str) -> None:
    schema = {"$ref": f"#/components/schemas/{model}", "components": document["components"]}
    jsonschema.validate(body, schema)


def test_the_document_is_valid_openapi_3_1_with_every_route(document):
    openapi_spec_validator.validate(document)
    assert document["openapi"] == "3.1.0" and document == json.loads(json.dumps(
        openapi_document(document["info"]["version"], max_n=128, max_logprobs=20)))
    assert set(document["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                      "/tokenize", "/detokenize", "/health", "/metrics",
                                      "/version"}


def test_the_document_states_the_servers_limits(document):
    fields = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["n"]["minimum"] == 1 and fields["n"]["maximum"] == 128
    integer = next(s for s in fields["logprobs"]["anyOf"] if s.get("type") == "integer")
    assert integer["minimum"] == 0 and integer["maximum"] == 20


def test_live_answers_validate_against_the_document(api_server, document):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    status, body = api_server.request("GET", "/v1/models", None, headers)
    assert status == 200
    _validate(document, body, "ModelList")
    status, body = api_server.request("POST", "/tokenize", {"prompt": "Hello"}, headers)
    _validate(document, body, "TokenizeResponse")
    status, body = api_server.request("POST", "/detokenize", {"tokens": body["tokens"]}, headers)
    _validate(document, body, "DetokenizeResponse")
    status, body = api_server.request("POST", "/v1/completions", {
        "prompt": "Hi", "max_tokens": 3, "logprobs": 2}, headers)
    assert status == 200
    _validate(document, body, "CompletionResponse")
    status, body = api_server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
        "top_logprobs": 2}, headers)
    assert status == 200
    _validate(document, body, "ChatCompletionResponse")
    status, body = api_server.request("POST", "/v1/completions", {"prompt": "Hi",
                                                                  "max_tokens": -1}, headers)
    assert status == 400
    _validate(document, body, "ErrorResponse")
