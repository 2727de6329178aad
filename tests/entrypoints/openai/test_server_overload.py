"""The server past its KV pool, driven by the openai client (slow: servers of their own).

The pool holds 32 blocks of 16 tokens and each prompt takes 150-200 tokens (10-13 blocks
before its output), so no more than three requests fit at once: a flood of 48 (plain and
streamed, completions and chat, n = 1 or 3, some clients hanging up) queues, preempts and
completes, each answer exact, and leaves nothing running, waiting or held. With
--max-num-waiting the surplus of a flood is a 503 in the OpenAI format and the rest
completes (an n above it, which could never wait, is a 400). A pool that could not hold
one max_model_len request is refused at start-up, before any compilation.
"""

import asyncio
import random

import openai
import pytest

from jaxserve.testing.hf_reference import random_prompts

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 256
POOL = ("--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "33",
        "--served-model-name", "m")
NUM_FLOOD = 48
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
WORDS = ("the", "a", "and", "of", "to")  # one token each with the test tokenizer


@pytest.fixture(scope="module")
def flood_server(start_server):
    server = start_server(*POOL)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def capped_server(start_server):
    server = start_server(*POOL, "--max-num-waiting", "8")
    yield server
    assert server.stop() == 0, server.log()


def async_client(server) -> openai.AsyncOpenAI:
    # No retries: a 503 must reach the test; a stuck request fails it by its timeout.
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                              timeout=180)


def prompt(i: int) -> list[int]:
    """Client i's prompt: 150-199 random token ids."""
    return random_prompts([150 + (i * 7) % 50], seed=i)[0]


def assert_idle(server) -> dict[str, float]:
    metrics = server.wait_idle(timeout=30)
    assert metrics["jaxserve:num_requests_running"] == 0
    assert metrics["jaxserve:num_requests_waiting"] == 0
    assert metrics["jaxserve:kv_cache_usage_perc"] == 0
    return metrics


def max_tokens(i: int) -> int:
    return 20 if i % 8 == 2 else 16 + i % 17


async def completion(client, i: int, *, n: int = 1, stream: bool = False,
                     leave: bool = False):
    """Client i's greedy completion: (text, finish_reason, usage), or "left" for one that
    hangs up after its first chunk; n greedy samples must be n equal choices."""
    ids = prompt(i)
    if not stream:
        result = await client.completions.create(model="m", prompt=ids, n=n, logprobs=1,
                                                 max_tokens=max_tokens(i), **GREEDY)
        first = result.choices[0]
        assert len(result.choices) == n and len(first.logprobs.tokens) == max_tokens(i)
        assert all((c.text, c.finish_reason) == (first.text, first.finish_reason)
                   for c in result.choices)
        return first.text, first.finish_reason, result.usage
    chunks = await client.completions.create(model="m", prompt=ids, max_tokens=max_tokens(i),
                                             stream=True,
                                             stream_options={"include_usage": True}, **GREEDY)
    text, finish, usage = "", None, None
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
        if leave and text:
            await chunks.close()
            return "left"
    return text, finish, usage


def chat_messages(i: int) -> list[dict]:
    """Client i's chat: about 166 tokens once templated."""
    words = " ".join(random.Random(i).choice(WORDS) for _ in range(150))
    return [{"role": "user", "content": words}]


async def chat(client, i: int):
    result = await client.chat.completions.create(
        model="m", messages=chat_messages(i), max_tokens=max_tokens(i), **GREEDY)
    return result.choices[0].message.content, result.choices[0].finish_reason, result.usage


async def give_up(client, i: int):
    """A plain completion whose client times out (closing its connection) while it waits."""
    try:
        return await asyncio.wait_for(completion(client, i), 0.5)
    except asyncio.TimeoutError:
        return "left"


async def one_of_the_flood(client, i: int):
    kind = i % 8
    if kind in (1, 5):
        return await completion(client, i, stream=True)
    if kind == 2:
        return await chat(client, i)
    if kind == 3:
        return await completion(client, i, stream=True, leave=True)
    if kind == 6:
        return await completion(client, i, n=3)
    if kind == 7:
        return await give_up(client, i)
    return await completion(client, i)


def test_a_flood_past_the_pool_preempts_completes_exactly_and_leaves_nothing_held(
        flood_server):
    before = flood_server.metrics()

    async def flood():
        client = async_client(flood_server)
        results = await asyncio.wait_for(asyncio.gather(*(
            one_of_the_flood(client, i) for i in range(NUM_FLOOD))), 300)
        alone = [await completion(client, i) for i in (0, 4, 8)]  # one at a time, after
        await client.close()
        return results, alone

    results, alone = asyncio.run(flood())
    for i, result in enumerate(results):
        if i % 8 == 3:
            assert result == "left"
            continue
        if result == "left":  # a client that gave up waiting
            continue
        text, finish, usage = result
        n = 3 if i % 8 == 6 else 1
        assert finish == "length" and len(text) > 0, (i, result)
        assert usage.completion_tokens == n * max_tokens(i), (i, usage)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if i % 8 == 2:
            _, tokens = flood_server.request("POST", "/tokenize",
                                             {"messages": chat_messages(i)})
            assert usage.prompt_tokens == tokens["count"] > 150, (i, usage)
        else:
            assert usage.prompt_tokens == len(prompt(i)), (i, usage)
    assert results.count("left") > NUM_FLOOD // 8  # a client gave up while it waited
    assert alone == [results[0], results[4], results[8]]  # preemption changed no answer
    metrics = assert_idle(flood_server)
    preemptions = (metrics["jaxserve:num_preemptions_total"]
                   - before["jaxserve:num_preemptions_total"])
    assert preemptions > 0
    aborted = (metrics["jaxserve:request_success_total{abort}"]
               - before["jaxserve:request_success_total{abort}"])
    assert aborted > 0  # the clients that left: their requests ended, their blocks freed
    assert flood_server.request("GET", "/health")[0] == 200


def test_past_max_num_waiting_a_flood_gets_503s_and_the_admitted_complete(capped_server):
    async def flood():
        client = async_client(capped_server)

        async def one(i):
            try:
                return await completion(client, i, stream=i % 3 == 0)
            except openai.InternalServerError as error:
                return error

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 300)
        after = await client.completions.create(model="m", prompt="Hello", max_tokens=4,
                                                **GREEDY)
        with pytest.raises(openai.BadRequestError) as never:  # could never wait together
            await client.completions.create(model="m", prompt="Hello", max_tokens=4, n=9)
        await client.close()
        return results, after, never.value

    results, after, never = asyncio.run(flood())
    assert never.body["param"] == "n" and "max_num_waiting=8" in never.body["message"]
    refused = [r for r in results if isinstance(r, openai.InternalServerError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(served) == 40 and len(refused) > 0 and len(served) >= 8
    for error in refused:
        assert error.status_code == 503
        assert error.body["type"] == "service_unavailable" and error.body["code"] == "503"
        assert "max_num_waiting=8" in error.body["message"]
    assert all(finish == "length" for _, finish, _ in served)
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 4
    assert_idle(capped_server)


def test_a_pool_that_cannot_hold_one_max_model_len_request_is_refused_at_start(
        launch_server):
    server = launch_server("--max-model-len", str(MAX_MODEL_LEN),
                           "--num-gpu-blocks-override", "16")
    assert server.stop(sig=None, timeout=120) != 0
    log = server.log()
    assert "one max_model_len=256 request needs 17" in log, log
    assert "Compiling" not in log  # refused before any program compiled
