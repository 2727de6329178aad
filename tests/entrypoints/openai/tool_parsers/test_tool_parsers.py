"""Each auto tool-call parser on outputs shaped as its model family writes them, whole and
streamed in deltas of several sizes (tags and JSON cut anywhere): the stream, accumulated as
the openai SDK accumulates it, equals the whole parse; arguments are valid JSON; text that
is no call (or a malformed one) stays content."""

import json

import pytest

from jaxserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS, call_id
from jaxserve.entrypoints.openai.tool_parsers.base import normalize
from jaxserve.entrypoints.openai.tool_parsers.stream import ToolCallStream

WEATHER = {"location": "San Francisco, CA", "unit": "celsius"}
CASES = [  # parser, output, content, [(name, arguments)]
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"location": "San Francisco, CA", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {"zone": "PST", "fmt": "a \\"b\\": {c}"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", WEATHER), ("get_time", {"zone": "PST",
                                                                 "fmt": 'a "b": {c}'})]),
    ("hermes", '<tool_call>\n{"name": "ping"}\n</tool_call>', "", [("ping", {})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", '
     '"unit": "celsius"}}', "", [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": [1, 2.5, null]}}; '
     '{"name": "b", "arguments": {"y": true}}', "", [("a", {"x": [1, 2.5, None]}),
                                                      ("b", {"y": True})]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": '
     '"San Francisco, CA", "unit": "celsius"}}, {"name": "ping", "arguments": {}}]',
     "Sure. ", [("get_weather", WEATHER), ("ping", {})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"location": "San Francisco, CA", "unit": '
     '"celsius"}[TOOL_CALLS]ping[ARGS]{}', "", [("get_weather", WEATHER), ("ping", {})]),
    ("pythonic", '[get_weather(location="San Francisco, CA", unit=\'celsius\'), '
     'roll(sides=6, fair=True, faces=[1, 2])]', "",
     [("get_weather", WEATHER), ("roll", {"sides": 6, "fair": True, "faces": [1, 2]})]),
    ("pythonic", '<|python_start|>[get_weather(location="San Francisco, CA", unit="celsius")]'
     '<|python_end|>', "", [("get_weather", WEATHER)]),
]
NOT_CALLS = [  # parser, output that is content
    ("hermes", "Just an answer."), ("hermes", "<tool_call>{not json}</tool_call>"),
    ("llama3_json", "The weather is fine."), ("llama3_json", '{"nam": 1}'),
    ("mistral", "No tools needed."), ("mistral", "[TOOL_CALLS] oops, not a call"),
    ("pythonic", "Plain words."), ("pythonic", "[1, 2, 3]"), ("pythonic", "[f(1)]"),
    # malformed in ways that once raised: a bad escape in a key, an empty name, values
    # that are Python literals without a JSON form
    ("llama3_json", '{"na\\me": "f", "parameters": {}}'),
    ("llama3_json", '{"name": "", "parameters": {}}'),
    ("pythonic", "[f(x={1, 2})]"), ("pythonic", "[f(x=b'1')]"), ("pythonic", "[f(x=1j)]"),
    ("pythonic", "[f(x=1\x00)]"),
]


def _stream(parser, text, step):
    """(content, [(id, name, arguments)]) accumulated from the stream, as the SDK does."""
    stream, content, calls = ToolCallStream(parser), "", {}
    for end in range(step, len(text) + step, step):
        new_content, deltas = stream.feed(text[:end], final=end >= len(text))
        content += new_content
        for delta in deltas:
            if delta.index not in calls:  # the first delta of a call: its id and name
                assert delta.id and delta.name and delta.index == len(calls)
                calls[delta.index] = [delta.id, delta.name, ""]
            else:
                assert delta.id is None and delta.name is None
            calls[delta.index][2] += delta.arguments
    return content, [tuple(calls[i]) for i in range(len(calls))]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_a_whole_output_parses(parser, text, content, calls):
    parsed = TOOL_CALL_PARSERS[parser](text, final=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert all(c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False)
               for c in parsed.calls)


@pytest.mark.parametrize("parser, text, content, calls", CASES)
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_the_stream_adds_up_to_the_whole_parse(parser, text, content, calls, step):
    whole = TOOL_CALL_PARSERS[parser](text, final=True)
    streamed_content, streamed = _stream(parser, text, step)
    assert streamed_content == content
    assert [(name, arguments) for _, name, arguments in streamed] == [
        (c.name, c.arguments) for c in whole.calls]
    assert len({call_id for call_id, _, _ in streamed}) == len(streamed)


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_json_arguments_stream_in_pieces(parser):
    text = next(t for p, t, _, _ in CASES if p == parser)
    stream, pieces = ToolCallStream(parser), []
    for end in range(1, len(text) + 1):
        pieces += [d for d in stream.feed(text[:end], final=end == len(text))[1]
                   if d.index == 0]
    assert pieces[0].name == "get_weather" and len(pieces) > 10


@pytest.mark.parametrize("parser, text", NOT_CALLS)
def test_text_that_is_no_call_stays_content(parser, text):
    assert TOOL_CALL_PARSERS[parser](text, final=True) is None
    for step in (1, 4):
        assert _stream(parser, text, step) == (text, [])


def test_a_call_cut_short_is_content_whole_but_was_streamed_in_part():
    """As in vLLM: a stream cannot take back what it sent of a call that max_tokens cut."""
    text = '<tool_call>{"name": "cut", "arguments": {"x": '
    assert TOOL_CALL_PARSERS["hermes"](text, final=True) is None
    content, calls = _stream("hermes", text, 3)
    assert content == "" and [(name, args) for _, name, args in calls] == [("cut", '{"x": ')]


def test_normalize_sets_json_dumps_whitespace_outside_strings():
    raw = '{ "a" :[1 ,2],\n "b": "x , y:  z" }'
    assert normalize(raw) == json.dumps(json.loads(raw))
    assert all(normalize(raw).startswith(normalize(raw[:n])) for n in range(len(raw)))


def test_mistral_ids_are_nine_letters_and_digits():
    assert len(call_id("mistral")) == 9 and call_id("mistral").isalnum()
    assert call_id("hermes").startswith("call_")
