"""Tool calling over HTTP with the official openai client: tool_choice "required" and a named
function are enforced by the grammar, so the tiny random-weight model's tool calls are valid
(a known name, arguments that validate against the tool's parameters) only because of it;
tool results go back through the template; a forced choice that the tools cannot meet is a
400 naming tool_choice."""

import json
import types

import jsonschema
import openai
import pytest

from jaxserve.entrypoints.openai.protocol import ChatMessage
from jaxserve.entrypoints.openai.serving_chat import render_chat
from jaxserve.entrypoints.openai.tools import ToolFields

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)
MODEL = "tiny-qwen2"


def _tool(name, properties):
    return {"type": "function", "function": {
        "name": name, "description": f"The {name} tool",
        "parameters": {"type": "object", "additionalProperties": False,
                       "required": sorted(properties), "properties": properties}}}


TOOLS = [_tool("get_weather", {"city": {"enum": ["paris", "oslo"]},
                               "unit": {"enum": ["c", "f"]}}),
         _tool("roll_dice", {"sides": {"type": "integer", "minimum": 2, "maximum": 9}})]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0)


def _chat(client, messages=MESSAGES, **extra):
    return client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                          **{"max_tokens": 80, "temperature": 0, **extra})


def _check_calls(choice, names):
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_required_gives_one_valid_tool_call_without_parallel_calls(client):
    greedy = _chat(client, tool_choice="required", parallel_tool_calls=False)
    sampled = _chat(client, tool_choice="required", parallel_tool_calls=False, seed=1,
                    temperature=1.0, n=3)
    for choice in (*greedy.choices, *sampled.choices):
        _check_calls(choice, set(PARAMETERS))
        assert len(choice.message.tool_calls) == 1


def test_required_with_parallel_calls_gives_one_or_more(client):
    """The random model may go on adding calls: a choice cut short keeps its text."""
    response = _chat(client, tool_choice="required", seed=0, temperature=1.0, n=3,
                     max_tokens=300)
    complete = [c for c in response.choices if c.finish_reason != "length"]
    assert complete, response
    for choice in complete:
        _check_calls(choice, set(PARAMETERS))
    for choice in response.choices:
        if choice.finish_reason == "length":
            assert choice.message.tool_calls is None
            assert choice.message.content.startswith('[{"name":"')


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_a_named_function_gives_a_call_of_it(client, name):
    choice = _chat(client, tool_choice={"type": "function", "function": {"name": name}})
    _check_calls(choice.choices[0], {name})
    assert len(choice.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("tool_choice", ["none", "auto", None])
def test_none_and_auto_generate_plain_text(client, tool_choice):
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    choice = _chat(client, max_tokens=4, **extra).choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)


def test_a_stream_sends_the_calls_whole_at_the_end(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                        tool_choice=named, max_tokens=80, temperature=0,
                                        stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()  # the SDK accumulates the deltas
    _check_calls(final.choices[0], {"get_weather"})
    chunks = list(_chat(client, tool_choice="required", parallel_tool_calls=False, n=2,
                        seed=3, temperature=1.0, stream=True))
    for index in range(2):
        deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert deltas[0].delta.role == "assistant" and not deltas[0].delta.tool_calls
        assert [d.finish_reason for d in deltas] == [None, "tool_calls"]
        (call,) = deltas[-1].delta.tool_calls
        assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments),
                            PARAMETERS[call.function.name])


def test_a_tool_result_round_trip(client):
    reply = _chat(client, tool_choice="required", parallel_tool_calls=False).choices[0].message
    call = reply.tool_calls[0]
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                      "arguments": c.function.arguments}}
        for c in reply.tool_calls]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    choice = _chat(client, messages, max_tokens=4).choices[0]
    assert isinstance(choice.message.content, str)
    named = {"type": "function", "function": {"name": "roll_dice"}}
    _check_calls(_chat(client, messages, tool_choice=named).choices[0], {"roll_dice"})


@pytest.mark.parametrize("body", [
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
    {"tools": TOOLS, "tool_choice": "sometimes"},
])
def test_a_forced_choice_the_request_cannot_meet_is_a_400_then_serving(client, body):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body=body)
    assert refused.value.param == "tool_choice", refused.value.body
    assert _chat(client, max_tokens=2).choices[0].message.content is not None


def test_an_invalid_parameters_schema_is_a_400_naming_tools(client):
    bogus = [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=bogus,
                                       tool_choice="required", max_tokens=4)
    assert refused.value.param == "tools" and "bogus" in refused.value.message


def test_a_function_without_parameters_gets_no_arguments(client):
    tools = [{"type": "function", "function": {"name": "now"}}]
    choice = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools,
                                            tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=60, temperature=0).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("now", {})]


def test_bad_tool_call_arguments_in_a_message_are_a_400(client):
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "roll_dice",
                                                         "arguments": "{not json"}}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(client, messages)
    assert refused.value.param == "messages", refused.value.body


TOOLS_TEMPLATE = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                  "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                  "{% for c in m.tool_calls or [] %}{{ c.function.name }}"
                  "{{ c.function.arguments.sides }}{% endfor %}"
                  "{{ m.tool_call_id or '' }}{% endfor %}")


def test_tools_and_tool_messages_reach_the_template(scripted):
    state = types.SimpleNamespace(tokenizer=scripted.tokenizer, chat_template=TOOLS_TEMPLATE,
                                  trust_request_chat_template=False)
    request = ToolFields.model_validate({"tools": TOOLS})
    messages = [ChatMessage.model_validate(m) for m in (
        *MESSAGES, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "roll_dice", "arguments": '{"sides": 6}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"})]
    text, _ = render_chat(state, messages, add_generation_prompt=False,
                          continue_final_message=False, chat_template=None,
                          chat_template_kwargs=None, tools=request.template_tools())
    assert text == ("[get_weather][roll_dice]<user>Weather in Paris?<assistant>roll_dice6"
                    "<tool>4call_1")
