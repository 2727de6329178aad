"""Structured outputs over HTTP with the official openai client: every form vLLM accepts
(response_format json_schema / json_object, structured_outputs, guided_*) reaches the engine,
and the tiny random-weight model's output is valid only because the grammar made it so."""

import json
import re
import typing

import jsonschema
import openai
import pydantic
import pytest

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
MESSAGES = [{"role": "user", "content": "Describe a fruit."}]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0)


def _chat(client, **extra):
    return client.chat.completions.create(model="tiny-qwen2", messages=MESSAGES, max_tokens=60,
                                          temperature=0, **extra).choices[0]


def test_response_format_json_schema_output_validates(client):
    choice = _chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "fruit", "schema": SCHEMA, "strict": True}})
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_the_sdk_parse_helper_gets_a_valid_pydantic_object(client):
    class Fruit(pydantic.BaseModel):  # what the SDK sends: a strict json_schema
        model_config = pydantic.ConfigDict(extra="forbid")
        color: typing.Literal["red", "green", "blue"]
        count: int = pydantic.Field(ge=0, le=9)

    completion = client.chat.completions.parse(model="tiny-qwen2", messages=MESSAGES,
                                               response_format=Fruit, max_tokens=60,
                                               temperature=0)
    assert isinstance(completion.choices[0].message.parsed, Fruit)


def test_vllm_structured_outputs_and_guided_fields(client):
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    choice = _chat(client, extra_body={"structured_outputs": compact})
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert "\n" not in choice.message.content and ": " not in choice.message.content
    assert _chat(client, extra_body={"guided_choice": ["yes", "no"]}).message.content in (
        "yes", "no")
    regex = r"[a-c]{2}-\d{3}"
    assert re.fullmatch(regex, _chat(client, extra_body={"guided_regex": regex,
                                                         "guided_decoding_backend": "xgrammar"}
                                     ).message.content)
    choice = _chat(client, extra_body={"guided_json": SCHEMA})
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    completion = client.completions.create(model="tiny-qwen2", prompt="x", max_tokens=8,
                                           temperature=0,
                                           extra_body={"guided_choice": ["up", "down"]})
    assert completion.choices[0].text in ("up", "down")


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "(unclosed"}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_decoding_backend": "magic", "guided_regex": "a"}, "guided_decoding_backend"),
])
def test_a_bad_spec_is_a_400_and_the_server_keeps_serving(client, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, extra_body=extra)
    assert param in str(error.value)
    assert _chat(client).message.content is not None
