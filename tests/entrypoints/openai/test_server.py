"""The OpenAI server end to end: a real `jaxserve serve` process driven by the openai client.

One server (tiny random qwen2, real BPE tokenizer, 512-token context; the session's
`api_server`, which the other API tests share) serves the whole module: completions and
chat, streamed == non-streamed, exact usage, seeded n, logprobs, stop strings, max_tokens
clamping, tokenize, metrics and disconnects under load.
"""

import asyncio

import openai
import pytest

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)
MODEL = "tiny-qwen2"
MAX_MODEL_LEN = 512
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def async_client_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0)


def prompt_tokens(server, **body) -> int:
    status, result = server.request("POST", "/tokenize", body,
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, result
    return result["count"]


def test_models_lists_the_served_name_with_max_model_len(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_stream_equals_non_stream_with_exact_usage(server, client):
    full = client.completions.create(model=MODEL, prompt="Hello, world!", max_tokens=12,
                                     **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello, world!", max_tokens=12,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.prompt_tokens == prompt_tokens(server, prompt="Hello, world!")
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == 12 + \
        full.usage.prompt_tokens
    assert full.choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream_with_exact_usage(server, async_client_factory):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]

    async def both():
        client = async_client_factory()
        full = await client.chat.completions.create(model=MODEL, messages=messages,
                                                    max_completion_tokens=10, **GREEDY)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=10, stream=True,
            stream_options={"include_usage": True}, **GREEDY)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return full, chunks

    full, chunks = asyncio.run(both())
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage == full.usage and full.usage.completion_tokens == 10
    assert full.usage.prompt_tokens == prompt_tokens(server, messages=messages)


def test_n_samples_with_a_seed_are_reproducible_and_stream_interleaved(client):
    kwargs = dict(model=MODEL, prompt="The quick brown", max_tokens=8, n=3, seed=1234,
                  temperature=1.0, extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each sample draws from its own seed
    streamed = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        (choice,) = chunk.choices
        streamed[choice.index] += choice.text
    assert streamed == texts
    assert first.usage.completion_tokens == 24


def test_completion_logprobs_have_the_asked_counts(client):
    result = client.completions.create(model=MODEL, prompt="Paged attention", max_tokens=6,
                                       logprobs=3, **GREEDY)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    # top 3 plus the chosen token; tokens that decode alike (partial UTF-8) share a key
    assert all(1 <= len(top) <= 4 for top in logprobs.top_logprobs)
    assert max(len(top) for top in logprobs.top_logprobs) >= 3
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert token in top and top[token] >= logprob
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens) == result.choices[0].text


def test_chat_logprobs_have_the_asked_counts(client):
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True,
        top_logprobs=2, **GREEDY)
    content = result.choices[0].logprobs.content
    assert len(content) == 5 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.logprob == entry.top_logprobs[0].logprob for entry in content)  # greedy


def test_stop_string_ends_the_text_before_it(client):
    base = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, **GREEDY)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text[:text.index(stop)]
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, stop=[stop],
                                        **GREEDY)
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    kept = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, stop=stop,
                                     temperature=0.0, extra_body={
                                         "ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop


def test_max_tokens_past_the_context_is_clamped(client):
    prompt = [5 + i % 200 for i in range(MAX_MODEL_LEN - 7)]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, **GREEDY)
    assert result.usage.completion_tokens == 7 and result.choices[0].finish_reason == "length"


def test_a_top_k_past_the_vocabulary_keeps_every_token(client):
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=8, seed=7, temperature=1.0)
    huge = client.completions.create(extra_body={"top_k": 10**12}, **kwargs)
    assert huge.choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_echo_prefixes_the_prompt(client):
    result = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, echo=True,
                                       **GREEDY)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, **GREEDY)
    assert result.choices[0].text == "Hello" + plain.choices[0].text


def test_tokenize_detokenize_version_and_health(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, tokens = server.request("POST", "/tokenize", {"prompt": "Hello, world!"}, auth)
    assert status == 200 and tokens["max_model_len"] == MAX_MODEL_LEN
    status, text = server.request("POST", "/detokenize", {"tokens": tokens["tokens"]}, auth)
    assert status == 200 and text["prompt"] == "Hello, world!"
    assert server.request("GET", "/version")[1]["version"]
    assert server.request("GET", "/health")[0] == 200


def test_metrics_parse_and_carry_the_vllm_names(server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, **GREEDY)
    metrics = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_success_total",
                 "num_compilations_total"):
        assert "jaxserve:" + name in metrics, name
    assert metrics["jaxserve:generation_tokens_total"] >= 3
    assert metrics["jaxserve:num_compilations_after_warm_up_total"] == 0


def test_64_streaming_clients_with_16_disconnecting_leave_nothing_behind(
        server, async_client_factory):
    aborted_before = server.metrics()["jaxserve:request_success_total{abort}"]

    async def one(client, i):
        leaves = i % 4 == 0  # asks for far more than it reads, then hangs up
        stream = await client.completions.create(
            model=MODEL, prompt=f"Client {i} says", max_tokens=400 if leaves else 24,
            stream=True, temperature=0.0, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if leaves and text:
                await stream.close()
                return "left"
        return finish

    async def crowd():
        client = async_client_factory()
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
        await client.close()
        return results

    results = asyncio.run(crowd())
    assert results.count("left") == 16 and results.count("length") == 48
    metrics = server.wait_idle()
    assert metrics["jaxserve:num_requests_running"] == 0
    assert metrics["jaxserve:num_requests_waiting"] == 0
    assert metrics["jaxserve:kv_cache_usage_perc"] == 0
    assert metrics["jaxserve:request_success_total{abort}"] - aborted_before == 16


def test_non_streaming_client_that_gives_up_aborts_its_request(server, async_client_factory):
    """A non-streaming client leaves once the engine holds all 128 of its samples (8
    prompts, n=16, 450 tokens each: seconds of work): every sample ends, aborted (or
    finished, for a group that got there first), and nothing stays behind."""
    before = server.metrics()

    def ended(metrics, reason):
        key = f"jaxserve:request_success_total{{{reason}}}"
        return metrics[key] - before[key]

    async def give_up():
        client = async_client_factory()
        request = asyncio.ensure_future(client.completions.create(
            model=MODEL, prompt=[f"Hello {i}" for i in range(8)], max_tokens=450, n=16,
            **GREEDY))
        for _ in range(500):  # until every sample is running, waiting or done
            await asyncio.sleep(0.01)
            metrics = await asyncio.to_thread(server.metrics)
            held = (metrics["jaxserve:num_requests_running"]
                    + metrics["jaxserve:num_requests_waiting"])
            if held + ended(metrics, "length") + ended(metrics, "abort") >= 128:
                break
        request.cancel()  # closes the connection, as a client timing out does
        with pytest.raises(asyncio.CancelledError):
            await request
        await client.close()

    asyncio.run(give_up())
    metrics = server.wait_idle()
    assert metrics["jaxserve:kv_cache_usage_perc"] == 0
    aborted, finished = ended(metrics, "abort"), ended(metrics, "length")
    assert aborted + finished == 128 and aborted >= 64, (aborted, finished)


def test_prompt_logprobs_come_back_per_prompt_token(server, client):
    result = client.completions.create(model=MODEL, prompt="Hello, world!", max_tokens=1,
                                       extra_body={"prompt_logprobs": 2})
    positions = result.choices[0].model_extra["prompt_logprobs"]
    assert len(positions) == prompt_tokens(server, prompt="Hello, world!")
    assert positions[0] is None
    assert all(2 <= len(p) <= 3 and all(v["logprob"] <= 0 for v in p.values())
               for p in positions[1:])
