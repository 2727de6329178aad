"""--reasoning-parser over the scripted engine, which answers with a think block: the message
carries it as reasoning_content (and vLLM's newer `reasoning`), the content the answer only;
a stream sends reasoning deltas, then content deltas; tool calls are read from the answer; a
template that closes the think block itself (enable_thinking=False) leaves all answer."""

import json

from jaxserve.testing.tokenizer import CHAT_TEMPLATE

THOUGHT = "<think>\nThe user greets me; greet back.\n</think>\n\n"
ANSWER = THOUGHT + "Hello there!"
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}
TOOL = {"type": "function", "function": {"name": "roll_dice", "parameters": {
    "type": "object", "properties": {"sides": {"type": "integer"}}}}}
# Qwen3's switch: with enable_thinking false the template writes an empty think block.
THINKING_TEMPLATE = CHAT_TEMPLATE + (
    "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}")


def chat(scripted, body, *, answer=ANSWER, **app_kwargs):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions", json=body)
        return response.status, (await response.text() if body.get("stream")
                                 else await response.json())

    return scripted.serve(test, app_kwargs=app_kwargs, answer=answer, max_model_len=256,
                          step_seconds=0.005 if body.get("stream") else 0.0)


def _stream_deltas(text):
    events = [json.loads(line[len("data: "):]) for line in text.split("\n\n")
              if line.startswith("data: {")]
    return [e["choices"][0] for e in events if e["choices"]]


def test_the_think_block_becomes_reasoning_content(scripted):
    status, body = chat(scripted, BODY, reasoning_parser="qwen3")
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "\nThe user greets me; greet back.\n"
    assert message["reasoning"] == message["reasoning_content"]
    assert message["content"] == "\n\nHello there!"
    assert body["choices"][0]["finish_reason"] == "length"


def test_include_reasoning_false_drops_the_think_block(scripted):
    for stream in (False, True):
        status, body = chat(scripted, {**BODY, "include_reasoning": False, "stream": stream},
                            reasoning_parser="qwen3")
        assert status == 200, body
        if stream:
            deltas = [d["delta"] for d in _stream_deltas(body)]
            assert not any(d.get("reasoning_content") for d in deltas)
            assert "".join(d.get("content") or "" for d in deltas) == "\n\nHello there!"
        else:
            message = body["choices"][0]["message"]
            assert message["reasoning_content"] is None
            assert message["content"] == "\n\nHello there!"


def test_without_a_parser_the_think_block_stays_content(scripted):
    status, body = chat(scripted, BODY)
    message = body["choices"][0]["message"]
    assert message["content"] == ANSWER and message["reasoning_content"] is None


def test_a_stream_sends_reasoning_then_content(scripted):
    status, text = chat(scripted, {**BODY, "stream": True}, reasoning_parser="deepseek_r1")
    assert status == 200
    deltas = [d["delta"] for d in _stream_deltas(text)]
    kinds = [("r" if d.get("reasoning_content") else "") + ("c" if d.get("content") else "")
             for d in deltas[1:]]
    kinds = [k for k in kinds if k]
    assert set(kinds) == {"r", "c"} and kinds == sorted(kinds, reverse=True)  # r... then c...
    assert len(kinds) > 4  # the scripted engine sends a token a step: many deltas
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (
        "\nThe user greets me; greet back.\n")
    assert "".join(d.get("content") or "" for d in deltas) == "\n\nHello there!"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


def test_tool_calls_are_read_from_the_answer_only(scripted):
    call = '<tool_call>{"name": "roll_dice", "arguments": {"sides": 6}}</tool_call>'
    answer = "<think>Maybe <tool_call> a die?</think>" + call
    for stream in (False, True):
        status, body = chat(scripted, {**BODY, "tools": [TOOL], "stream": stream},
                            answer=answer, reasoning_parser="qwen3", tool_call_parser="hermes")
        assert status == 200, body
        if stream:
            deltas = _stream_deltas(body)
            reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
            calls = [c for d in deltas for c in d["delta"].get("tool_calls") or ()]
            finish = deltas[-1]["finish_reason"]
        else:
            message = body["choices"][0]["message"]
            reasoning, calls = message["reasoning_content"], message["tool_calls"]
            finish = body["choices"][0]["finish_reason"]
            assert message["content"] is None
        assert reasoning == "Maybe <tool_call> a die?" and finish == "tool_calls"
        assert [c["function"]["name"] for c in calls if c["function"].get("name")] == [
            "roll_dice"]


def test_a_template_that_closes_the_think_block_leaves_all_answer(scripted):
    """deepseek_r1 reads an untagged output as reasoning, unless the prompt closed it."""
    body = {**BODY, "chat_template_kwargs": {"enable_thinking": False}}
    for request, reasoning, content in ((BODY, "Just the answer.", None),
                                        (body, None, "Just the answer.")):
        status, response = chat(scripted, request, answer="Just the answer.",
                                reasoning_parser="deepseek_r1", chat_template=THINKING_TEMPLATE)
        assert status == 200, response
        message = response["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (reasoning, content)
