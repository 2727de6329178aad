"""The app in-process, over the scripted engine of conftest.py (known answer and logprobs):
the OpenAI formats, errors the real model cannot be made to produce (a dying engine, a full
queue, a shutdown that outlives its grace period) and request parsing details. The real
engine is served in test_server.py.
"""

import asyncio
import json
import socket

import aiohttp
import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.entrypoints.openai.api_server import build_app, serve_http

async def sse_events(response):
    text = await response.text()
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def test_completion_logprobs_use_the_completions_format(scripted):
    async def test(client, engine):
        response = await client.post("/v1/completions", json={
            "prompt": "Hello", "max_tokens": 3, "logprobs": 2})
        return await response.json()

    body = scripted.serve(test)
    logprobs = body["choices"][0]["logprobs"]
    decode = scripted.tokenizer.decode
    tokens = [decode([t]) for t in scripted.tokenizer.encode(scripted.answer)[:3]]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == [-1.5] * 3
    assert logprobs["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    for token, top in zip(tokens, logprobs["top_logprobs"]):
        assert top == {decode([7]): -0.25, token: -1.5}  # the top 2 hold the chosen token
    assert body["choices"][0]["text"] == "".join(tokens)


def test_chat_logprobs_use_the_chat_format_and_minus_infinity_becomes_minus_9999(scripted):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 3})
        return await response.json()

    content = scripted.serve(test)["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    for entry in content:
        assert entry["logprob"] == -1.5 and entry["bytes"] == list(entry["token"].encode())
        assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.25, -1.5, -9999.0]


def test_echo_with_logprobs_reports_the_prompt_tokens_first(scripted):
    async def test(client, engine):
        response = await client.post("/v1/completions", json={
            "prompt": "Hello", "max_tokens": 1, "logprobs": 1, "echo": True})
        return await response.json()

    choice = scripted.serve(test)["choices"][0]
    prompt_ids = scripted.tokenizer.encode("Hello")
    assert choice["text"].startswith("Hello")
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids) + 1
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["top_logprobs"][0] is None


def test_several_prompts_get_choice_indices_in_prompt_order(scripted):
    async def test(client, engine):
        body = {"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}
        full = await (await client.post("/v1/completions", json=body)).json()
        stream = await sse_events(await client.post("/v1/completions",
                                                    json={**body, "stream": True}))
        return full, stream

    full, stream = scripted.serve(test)
    assert [c["index"] for c in full["choices"]] == list(range(6))
    assert full["usage"]["completion_tokens"] == 12
    chunks = [json.loads(e) for e in stream[:-1]]
    assert sorted({c["choices"][0]["index"] for c in chunks}) == list(range(6))
    assert all(len(c["choices"]) == 1 for c in chunks) and stream[-1] == "[DONE]"


def test_engine_death_errors_in_band_as_500_then_done_and_health_turns_503(scripted):
    async def test(client, engine):
        assert (await client.get("/health")).status == 200
        engine.paused.set()
        response = await client.post("/v1/completions", json={
            "prompt": "Hello", "max_tokens": 4, "stream": True})
        engine.fail.set()
        events = await sse_events(response)
        return events, (await client.get("/health")).status, await client.post(
            "/v1/completions", json={"prompt": "Hello"})

    events, health, after = scripted.serve(test)
    assert events[-1] == "[DONE]"  # the request in the engine: 500; later ones: 503
    assert json.loads(events[-2])["error"]["code"] == "500"
    assert health == 503 and after.status == 503


def test_full_waiting_queue_is_503_and_the_queued_requests_still_finish(scripted):
    async def test(client, engine):
        engine.paused.set()
        queued = [asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hi"}))
                  for _ in range(2)]
        while len(engine.live) < 2:
            await asyncio.sleep(0.01)
        response = await client.post("/v1/completions", json={"prompt": "Hello"})
        engine.paused.clear()
        return response.status, await response.json(), [(await q).status for q in queued]

    status, body, queued = scripted.serve(test, max_waiting=2)
    assert status == 503 and "already waiting" in body["error"]["message"]
    assert queued == [200, 200]


@pytest.mark.parametrize("messages,extra,param", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
     "messages"),
    ([{"role": "user", "content": "hi"}], {"continue_final_message": True}, "messages"),
    ([{"role": "user", "content": "hi"}], {"chat_template": "{{ raise_exception('no') }}"},
     "messages"),
    ([{"role": "user", "content": "hi"}], {"chat_template": "{% for"}, "messages"),
    ([], {}, "messages"),
])
def test_chat_inputs_the_template_rejects_are_400(scripted, messages, extra, param):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions",
                                     json={"messages": messages, **extra})
        return response.status, await response.json()

    status, body = scripted.serve(test, app_kwargs={"trust_request_chat_template": True})
    assert status == 400 and body["error"]["param"] == param


def test_a_request_chat_template_needs_the_trust_flag(scripted):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' }}"})
        return response.status, await response.json()

    status, body = scripted.serve(test)
    assert status == 400 and body["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in body["error"]["message"]


def test_chat_content_parts_and_echo(scripted):
    async def test(client, engine):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                         {"role": "assistant", "content": "Sure:"}],
            "add_generation_prompt": False, "continue_final_message": True, "echo": True,
            "max_tokens": 2})
        return await response.json()

    message = scripted.serve(test)["choices"][0]["message"]
    assert message["content"].startswith("Sure:") and len(message["content"]) > 5


def test_aiohttp_errors_come_in_the_openai_body(scripted):
    async def test(client, engine):
        missing = await client.get("/v1/nothing")
        wrong_method = await client.get("/v1/completions")
        return (missing.status, await missing.json()), (wrong_method.status,
                                                        await wrong_method.json())

    (missing, missing_body), (wrong, wrong_body) = scripted.serve(test)
    assert missing == 404 and missing_body["error"]["type"] == "not_found_error"
    assert wrong == 405 and "error" in wrong_body


def test_shutdown_cancels_what_outlives_the_grace_period_and_aborts_it(scripted):
    engine = scripted.engine()
    async_engine = AsyncEngine(engine)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main():
        app = build_app(async_engine, served_model_names=["scripted"])
        stop = asyncio.Event()
        server = asyncio.create_task(serve_http(app, "127.0.0.1", port, shutdown_timeout=0.3,
                                                stop=stop))
        engine.paused.set()  # the request will not finish by itself
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    response = await session.post(f"http://127.0.0.1:{port}/v1/completions",
                                                  json={"prompt": "Hi", "stream": True})
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            while not engine.live:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.wait_for(server, 5)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # cut off: no [DONE]
        while engine.live:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        async_engine.shutdown()
