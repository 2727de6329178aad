"""The auto tool-call parser (--enable-auto-tool-choice --tool-call-parser hermes) over the
scripted engine, which can be made to answer with a model's tool-call syntax: its calls
become `tool_calls` (streamed name first, then argument pieces), the text before them the
content; without
the parser, with tool_choice "none", or with text that is no call, the answer stays content."""

import json

import openai
import pytest

from jaxserve.entrypoints.openai.tools import ToolFields

TOOL = {"type": "function", "function": {"name": "roll_dice", "parameters": {
    "type": "object", "properties": {"sides": {"type": "integer"}}}}}
CALLS = ('Sure.<tool_call>{"name": "roll_dice", "arguments": {"sides": 6}}</tool_call>'
         '<tool_call>{"name": "roll_dice", "arguments": {"sides": 2}}')  # cut short of its tag
BODY = {"messages": [{"role": "user", "content": "Hi"}], "tools": [TOOL], "max_tokens": 200}
HERMES = {"tool_call_parser": "hermes"}


def chat(scripted, body, *, answer=CALLS, app_kwargs=HERMES):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions", json=body)
        return response.status, (await response.json() if not body.get("stream")
                                 else await response.text())

    return scripted.serve(test, app_kwargs=app_kwargs, answer=answer, max_model_len=256)


def test_auto_calls_become_tool_calls(scripted):
    status, body = chat(scripted, BODY)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "roll_dice", {"sides": 6}),
                                ("function", "roll_dice", {"sides": 2})]
    assert all(c["id"].startswith("call_") for c in calls)


ANSWERS = {  # each parser's syntax, as its model family writes two calls
    "hermes": CALLS,
    "llama3_json": '{"name": "roll_dice", "parameters": {"sides": 6}}; '
                   '{"name": "roll_dice", "parameters": {"sides": 2}}',
    "mistral": 'Sure.[TOOL_CALLS][{"name": "roll_dice", "arguments": {"sides": 6}}, '
               '{"name": "roll_dice", "arguments": {"sides": 2}}]',
    "pythonic": "[roll_dice(sides=6), roll_dice(sides=2)]",
}


@pytest.mark.parametrize("parser", sorted(ANSWERS))
def test_the_sdk_accumulates_the_streamed_calls_into_the_whole_ones(scripted, parser):
    """The openai SDK's stream helper gets the name first, then argument pieces, and ends
    with the calls (names, arguments) and content of the non-streamed answer."""
    async def test(client, engine):
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none",
                                 max_retries=0)
        kwargs = dict(model="scripted", messages=BODY["messages"], tools=BODY["tools"],
                      max_tokens=200)
        whole = await sdk.chat.completions.create(**kwargs)
        engine.step_seconds = 0.002  # a token per chunk
        events = []
        async with sdk.chat.completions.stream(**kwargs) as stream:
            async for event in stream:
                events.append(event)
            streamed = await stream.get_final_completion()
        return whole.choices[0], streamed.choices[0], events

    whole, streamed, events = scripted.serve(
        test, app_kwargs={"tool_call_parser": parser}, answer=ANSWERS[parser],
        max_model_len=256)
    assert whole.finish_reason == streamed.finish_reason == "tool_calls"
    assert streamed.message.content == whole.message.content
    expected = [("roll_dice", '{"sides": 6}'), ("roll_dice", '{"sides": 2}')]
    for choice in (whole, streamed):
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == (
            expected)
    pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert [e.index for e in pieces] == sorted(e.index for e in pieces)
    if parser != "pythonic":  # pythonic calls go out whole, once closed
        assert len(pieces) > 4


@pytest.mark.parametrize("case", ["no parser", "tool_choice none", "no tools", "not json"])
def test_otherwise_the_answer_stays_content(scripted, case):
    body, answer, app_kwargs = dict(BODY), CALLS, HERMES
    if case == "no parser":
        app_kwargs = {}
    elif case == "tool_choice none":
        body["tool_choice"] = "none"
    elif case == "no tools":
        del body["tools"]
    else:
        answer = "<tool_call>{not json</tool_call>"
    status, response = chat(scripted, body, answer=answer, app_kwargs=app_kwargs)
    assert status == 200, response
    message = response["choices"][0]["message"]
    assert message["content"] == answer and message["tool_calls"] is None


def test_the_parser_reads_plain_text_as_no_call():
    fields = ToolFields.model_validate({"tools": [TOOL]})
    assert fields.tool_calls_in("just text", "hermes") is None
    assert fields.tool_calls_in("just text", None) is None


@pytest.mark.parametrize("parser, keeps", [("mistral", True), ("hermes", False)])
def test_mistral_requests_keep_the_special_tokens_that_mark_calls(scripted, parser, keeps):
    async def test(client, engine):
        seen, add_request = [], engine.add_request
        engine.add_request = lambda *args, **kwargs: (seen.append(args[2]),
                                                      add_request(*args, **kwargs))[1]
        for body in (BODY, {**BODY, "tool_choice": "none"}):
            assert (await client.post("/v1/chat/completions", json=body)).status == 200
        return [params.skip_special_tokens for params in seen]

    assert scripted.serve(test, app_kwargs={"tool_call_parser": parser}, answer=CALLS,
                          max_model_len=256) == [not keeps, True]
