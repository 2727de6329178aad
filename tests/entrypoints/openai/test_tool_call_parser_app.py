"""The auto tool-call parser (--enable-auto-tool-choice --tool-call-parser hermes) over the
scripted engine, which can be made to answer with a model's tool-call syntax: its calls
become `tool_calls` (streamed whole at the end), the text before them the content; without
the parser, with tool_choice "none", or with text that is no call, the answer stays content."""

import json

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


def test_auto_calls_stream_whole_at_the_end(scripted):
    status, text = chat(scripted, {**BODY, "stream": True})
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in text.split("\n\n")
              if line.startswith("data: {")]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    assert deltas[0]["delta"]["role"] == "assistant" and deltas[0]["delta"]["content"] is None
    assert len(deltas) == 2 and deltas[-1]["finish_reason"] == "tool_calls"
    assert deltas[-1]["delta"]["content"] == "Sure."
    assert [c["index"] for c in deltas[-1]["delta"]["tool_calls"]] == [0, 1]


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
