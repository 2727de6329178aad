"""--reasoning-parser deepseek_r1 on the real engine, with the official openai client: the
tiny checkpoint's tokenizer has `</think>` as a token of its own. Left alone, the random
model never closes its think block, so its whole output is reasoning, and a grammar never
starts; a logit bias on `</think>` closes the block at once, and then the grammar makes the
answer valid JSON, which is all the content. Streamed deltas add up to the whole answers."""

import asyncio
import json

import jsonschema
import openai
import pytest
from aiohttp.test_utils import TestServer

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.entrypoints.openai.api_server import build_app

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "size"],
          "properties": {"color": {"enum": ["red", "green"]},
                         "size": {"type": "integer", "minimum": 1, "maximum": 9}}}
# vLLM's field, for JSON without whitespace (the random model would pad it out)
FORMAT = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}
MESSAGES = [{"role": "user", "content": "Hello"}]


def _serve(engine, test):
    async_engine = AsyncEngine(engine)

    async def main():
        app = build_app(async_engine, served_model_names=["thinking"],
                        reasoning_parser="deepseek_r1")
        server = TestServer(app)
        await server.start_server()
        try:
            client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none",
                                        max_retries=0)
            return await asyncio.wait_for(test(client), 60)
        finally:
            await server.close()

    try:
        return asyncio.run(main())
    finally:
        async_engine.shutdown()


async def _both(client, **kwargs):
    """(whole message, finish reason, streamed reasoning, streamed content)."""
    kwargs = dict(model="thinking", messages=MESSAGES, temperature=0.0, max_tokens=40,
                  **kwargs)
    whole = (await client.chat.completions.create(**kwargs)).choices[0]
    reasoning, content = "", ""
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not (delta.reasoning_content and delta.content)  # reasoning, then content
        assert not (reasoning and content is None) or not delta.reasoning_content
        reasoning += delta.reasoning_content or ""
        content += delta.content or ""
    return whole.message, whole.finish_reason, reasoning, content


def test_reasoning_then_a_grammar_shaped_answer_through_the_server(thinking_llm):
    end = thinking_llm.get_tokenizer().convert_tokens_to_ids("</think>")

    async def test(client):
        return (await _both(client),
                await _both(client, extra_body=FORMAT),
                await _both(client, extra_body=FORMAT, logit_bias={str(end): 100}))

    free, unclosed, closed = _serve(thinking_llm.llm_engine, test)
    message, finish, reasoning, content = free
    assert message.content is None and message.reasoning_content and finish == "length"
    assert (reasoning, content) == (message.reasoning_content, "")
    # the grammar waits for the end of the think block, which never comes
    assert unclosed[0].reasoning_content == message.reasoning_content
    message, finish, reasoning, content = closed
    assert message.reasoning_content is None and finish == "stop"
    jsonschema.validate(json.loads(message.content), SCHEMA)
    assert (reasoning, content) == ("", message.content)


@pytest.mark.slow
def test_the_serve_flag_reaches_the_server_and_the_engine(start_server):
    """`jaxserve serve --reasoning-parser deepseek_r1` on the plain tiny checkpoint, whose
    tokenizer has no think tokens: the random output never closes the block, so it is all
    reasoning, and a grammar waits for the block's end."""
    server = start_server("--reasoning-parser", "deepseek_r1")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        kwargs = dict(model=client.models.list().data[0].id, messages=MESSAGES,
                      temperature=0.0, max_tokens=10)
        free = client.chat.completions.create(**kwargs).choices[0].message
        waiting = client.chat.completions.create(**kwargs, extra_body=FORMAT).choices[0]
    finally:
        assert server.stop() == 0
    assert free.content is None and free.reasoning_content
    assert waiting.message.reasoning_content == free.reasoning_content
