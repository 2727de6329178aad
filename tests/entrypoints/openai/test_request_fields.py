"""Nothing a client sends is silently ignored. Every field of the installed openai SDK's
completion and chat requests (the TypedDicts, inherited keys and nested stream options
included) is implemented (a field of jaxserve's model that the server reads), metadata
(accepted, ignored) or refused (request_fields.py: a 400 naming it), so a field a new openai
release adds fails here until it is classified. The refusals and the values that ask for
nothing are checked on the session's real server through the openai client.
"""

import json
import logging
import pathlib
import re
import typing

import openai
import pytest
import typing_extensions
from openai.types import completion_create_params as completion_sdk
from openai.types.chat import completion_create_params as chat_sdk

from jaxserve.entrypoints.openai import protocol, request_fields

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)
MODEL = "tiny-qwen2"
OPENAI_DIR = pathlib.Path(protocol.__file__).parent
FUNCTIONS = [{"name": "f", "parameters": {"type": "object"}}]  # the deprecated form of tools

# endpoint -> (the SDK's params module, jaxserve's model, the rest of a minimal request)
ENDPOINTS = {
    "chat": (chat_sdk, protocol.ChatCompletionRequest,
             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    "completions": (completion_sdk, protocol.CompletionRequest, {"prompt": "Hi", "max_tokens": 1}),
}
# A value of each refused field that asks for what jaxserve lacks.
TURNED_ON = {
    "functions": FUNCTIONS, "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "Hi"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"}, "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h", "documents": [{"title": "t", "text": "x"}],
    "thinking_token_budget": 8, "suffix": " end", "best_of": 2,
    "prompt_embeds": "AAAA", "use_beam_search": True, "length_penalty": 0.5,
    "truncate_prompt_tokens": 4, "allowed_token_ids": [1, 2], "bad_words": ["x"],
    "guided_whitespace_pattern": " ", "structural_tag": "{}",
    "logits_processors": ["my.processor"],
    "return_tokens_as_token_ids": True, "return_token_ids": True,
    "kv_transfer_params": {"do_remote_decode": True}, "vllm_xargs": {"a": 1},
    "request_id": "mine", "mm_processor_kwargs": {"a": 1},
    "include_obfuscation": True, "continuous_usage_stats": True,
}
METADATA = {"user": "u-1", "metadata": {"team": "a"}, "store": True, "service_tier": "flex",
            "safety_identifier": "hash-1", "prompt_cache_key": "k"}


def sdk_fields(module) -> dict[str, object]:
    """Every key the SDK may send, `stream` (a key of the two subclasses) included."""
    return {**typing.get_type_hints(module.CompletionCreateParamsNonStreaming),
            **typing.get_type_hints(module.CompletionCreateParamsStreaming)}


def nested_typeddict(annotation):
    """The TypedDict inside Optional/Required/Union, if there is one."""
    if typing_extensions.is_typeddict(annotation):
        return annotation
    return next(filter(None, map(nested_typeddict, typing.get_args(annotation))), None)


def nested_model(annotation):
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, protocol.OpenAIModel):
            return arg
    return None


def classify(fields: dict[str, object], model, prefix="") -> dict[str, str]:
    """'implemented' / 'metadata' / 'refused' / 'UNCLASSIFIED' per SDK field (and per key of
    a nested TypedDict that jaxserve parses with a model of its own)."""
    kinds = {}
    for name, annotation in fields.items():
        if name in model.metadata_fields:
            kinds[prefix + name] = "metadata"
        elif name in model.refused_fields:
            kinds[prefix + name] = "refused"
        elif name in model.model_fields:
            kinds[prefix + name] = "implemented"
            inner = nested_model(model.model_fields[name].annotation)
            sdk_inner = nested_typeddict(annotation)
            if inner is not None and sdk_inner is not None:
                kinds.update(classify(typing.get_type_hints(sdk_inner), inner, f"{name}."))
        else:
            kinds[prefix + name] = "UNCLASSIFIED"
    return kinds


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_field_the_openai_sdk_sends_is_classified(endpoint):
    module, model, _ = ENDPOINTS[endpoint]
    kinds = classify(sdk_fields(module), model)
    unclassified = sorted(name for name, kind in kinds.items() if kind == "UNCLASSIFIED")
    assert not unclassified, (
        f"openai {openai.__version__} sends {endpoint} fields jaxserve has not classified: "
        f"{unclassified}; implement each, or add it to request_fields.py (refused or metadata)")
    assert "stream_options.include_usage" in kinds  # the nested keys were walked too


def test_the_three_classes_are_disjoint():
    for model in (protocol.ChatCompletionRequest, protocol.CompletionRequest,
                  protocol.StreamOptions):
        fields, refused = set(model.model_fields), set(model.refused_fields)
        assert not fields & refused and not fields & model.metadata_fields
        assert not refused & model.metadata_fields


@pytest.mark.parametrize("model", [protocol.ChatCompletionRequest, protocol.CompletionRequest,
                                   protocol.StreamOptions])
def test_every_implemented_field_is_read_by_the_server(model):
    """A field in the model that no code reads would be accepted and dropped."""
    source = "\n".join(p.read_text() for p in OPENAI_DIR.glob("*.py"))
    unread = [name for name in model.model_fields if not re.search(rf"\.{name}\b", source)]
    assert not unread


def refused_cases():
    for endpoint, (_, model, _) in ENDPOINTS.items():
        for name in model.refused_fields:
            yield endpoint, name
        for name in protocol.StreamOptions.refused_fields:
            yield endpoint, f"stream_options.{name}"


def test_every_refused_field_has_a_turned_on_value():
    assert {name.rpartition(".")[2] for _, name in refused_cases()} == set(TURNED_ON)


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0)


def create(client, endpoint: str, body: dict):
    """One request through the SDK: its own keyword for each field it knows, extra_body for
    the rest (vLLM's)."""
    module, _, base = ENDPOINTS[endpoint]
    method = (client.chat.completions if endpoint == "chat" else client.completions).create
    known = set(sdk_fields(module))
    body = {"model": MODEL, **base, **body}
    kwargs = {k: v for k, v in body.items() if k in known}
    return method(**kwargs, extra_body={k: v for k, v in body.items() if k not in known})


@pytest.mark.parametrize("endpoint,param", list(refused_cases()))
def test_a_refused_field_turned_on_is_a_400_naming_it(client, endpoint, param):
    head, _, name = param.rpartition(".")
    body, expected = {name: TURNED_ON[name]}, param
    if head:
        body = {"stream": True, head: body}
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, endpoint, body)
    error = refused.value
    assert error.status_code == 400 and error.param == expected, error.body
    assert error.body == {"message": error.body["message"], "type": "invalid_request_error",
                          "param": expected, "code": "400"}
    assert error.body["message"].startswith(f"{expected} is not supported: ")


def off_values(model) -> dict[str, list]:
    """Per refused field, every value the table says asks for nothing (null first)."""
    return {name: [None, *rule.allowed] for name, rule in model.refused_fields.items()}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_values_that_ask_for_nothing_and_metadata_are_accepted(client, endpoint):
    _, model, _ = ENDPOINTS[endpoint]
    values = off_values(model)
    stream_values = off_values(protocol.StreamOptions)
    for i in range(max(map(len, [*values.values(), *stream_values.values()]))):
        body = {name: choices[i % len(choices)] for name, choices in values.items()}
        if endpoint == "completions":
            body.update(n=2, best_of=2)
        options = {name: choices[i % len(choices)] for name, choices in stream_values.items()}
        response = create(client, endpoint, {**body, **METADATA})
        assert len(response.choices) == body.get("n", 1)
        chunks = list(create(client, endpoint, {**body, "stream": True, "stream_options": {
            **options, "include_usage": True}}))
        assert chunks[-1].usage.completion_tokens == body.get("n", 1)


def test_a_refused_field_in_a_stream_is_refused_before_the_stream_starts(api_server):
    status, body = api_server.request(
        "POST", "/v1/chat/completions", {**ENDPOINTS["chat"][2], "stream": True,
                                         "functions": FUNCTIONS},
        {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and body["error"]["param"] == "functions", body


def test_the_documented_400_is_the_servers(api_server):
    docs = (OPENAI_DIR.parents[2] / "docs" / "serving.md").read_text()
    example = re.search(r"## Request fields.*?```json\n(.*?)```", docs, re.S)
    status, body = api_server.request("POST", "/v1/chat/completions",
                                      {**ENDPOINTS["chat"][2], "functions": FUNCTIONS},
                                      {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and json.loads(example.group(1)) == body


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_fields_are_ignored_with_a_warning_and_metadata_silently(scripted, caplog,
                                                                       route):
    endpoint = "chat" if "chat" in route else "completions"

    async def test(client, engine):
        with caplog.at_level(logging.DEBUG, logger=request_fields.__name__):
            response = await client.post(route, json={
                **ENDPOINTS[endpoint][2], "frobnicate": True, **METADATA})
        return response.status

    assert scripted.serve(test) == 200
    (record,) = [r for r in caplog.records if r.name == request_fields.__name__]
    assert record.levelno == logging.WARNING and "['frobnicate']" in record.getMessage()
