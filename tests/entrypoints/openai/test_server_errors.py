"""Every way a request can be wrong, against a real server: the status (400, 401, 404, 413),
the OpenAI error body naming the parameter, and the server still serving afterwards.
"""

import re

import openai
import pytest

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS), with 1 MiB bodies
MODEL = "tiny-qwen2"
MAX_MODEL_LEN = 512
VOCAB = 320


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize("body,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5}, "min_tokens"),
    ({"seed": 2**64}, "seed"), ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"999": 1}}, "logit_bias"), ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"prompt": ""}, "prompt"),
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": []}, "prompt"), ({"prompt": [1, VOCAB]}, "prompt"), ({"prompt": [-1]}, "prompt"),
    ({"prompt": [5] * MAX_MODEL_LEN}, "prompt"), ({"n": "three"}, "n"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"prompt": None}, "prompt"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": [2**40], "min_tokens": 1}, "stop_token_ids"),
    ({"n": 129}, "n"), ({"suffix": "x"}, "suffix"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": [2**40], "echo": True}, "prompt"),
    ({"prompt": [1, True]}, "prompt"), ({"stop_token_ids": [True]}, "stop_token_ids.0"),
    ({"prompt": [[5, "6"]]}, "prompt"),
])
def test_invalid_completion_is_400_naming_the_parameter(server, body, param):
    status, result = server.request("POST", "/v1/completions", {**COMPLETION, **body},
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400, result
    assert result["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert result["error"]["param"] == param, result
    assert_still_serving(server)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"max_completion_tokens": 0}, "max_tokens"),
])
def test_invalid_chat_is_400(server, body, param):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, result = server.request("POST", "/v1/chat/completions", {**chat, **body},
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400, result
    if param is not None:
        assert result["error"]["param"] == param, result
    assert_still_serving(server)


@pytest.mark.parametrize("data,headers,status", [
    (b"{not json", {}, 400), (b"[1, 2]", {}, 400),
    (b'{"prompt": "Hi", "temperature": NaN}', {}, 400),
    (b'{"prompt": "Hi", "top_p": Infinity}', {}, 400),
    (b'{"model": "gpt-4", "prompt": "Hi"}', {}, 404),
    (b'{"prompt": "Hi"}', {"Authorization": "Bearer wrong"}, 401),
    (b'{"prompt": "Hi"}', {"Authorization": ""}, 401),
    (b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}', {}, 413),
    # nested past the JSON decoder's recursion bound (it was a 500: RecursionError)
    (b'{"prompt": "Hi", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400),
])
def test_bad_requests_get_their_status_in_the_openai_body(server, data, headers, status):
    got, result = server.request("POST", "/v1/completions", data,
                                 {"Authorization": f"Bearer {API_KEY}", **headers})
    assert got == status, result
    assert set(result["error"]) == {"message", "type", "param", "code"}
    assert_still_serving(server)


@pytest.mark.parametrize("path,data,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}', "messages"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": "caf\xe9 \xff\xfe", "max_tokens": 1}', None),
])
def test_text_the_tokenizer_cannot_take_is_400_for_that_request_only(server, path, data, param):
    """A lone surrogate is valid JSON but no text the tokenizer can encode; a body that is
    not UTF-8 is no JSON at all."""
    status, result = server.request("POST", path, data, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and result["error"]["param"] == param, result
    assert_still_serving(server)


@pytest.mark.parametrize("body,prompt_ids,param", [
    ({"prompt": [5] * MAX_MODEL_LEN}, [5] * MAX_MODEL_LEN, "prompt"),
    ({"prompt": [5] * (MAX_MODEL_LEN + 3)}, [5] * (MAX_MODEL_LEN + 3), "prompt"),
    ({"prompt": ""}, [], "prompt"), ({"prompt": [1, VOCAB]}, [1, VOCAB], "prompt"),
])
def test_what_the_engine_refuses_is_400_with_the_engines_own_message(server, qwen2_llm, body,
                                                                     prompt_ids, param):
    """The engine checks a request against the model once; the server only reports it."""
    with pytest.raises(ValueError) as refused:  # the same checkpoint and max_model_len
        qwen2_llm.llm_engine.add_request(None, prompt_ids)
    status, result = server.request("POST", "/v1/completions", {**COMPLETION, **body},
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and result["error"]["message"] == str(refused.value), result
    assert result["error"]["param"] == param


def test_a_conversation_too_long_names_messages_with_the_engines_message(server):
    status, result = server.request(
        "POST", "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]},
        {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and result["error"]["param"] == "messages"
    assert re.fullmatch(rf"prompt is \d+ tokens; max_model_len={MAX_MODEL_LEN} leaves no "
                        "room for an output token", result["error"]["message"]), result


def test_openai_client_sees_401_without_the_key_and_404_for_another_model(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)


def test_detokenize_takes_integers_only(server):
    status, result = server.request("POST", "/detokenize", {"tokens": [True, False]},
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and result["error"]["param"] == "tokens.0", result


def assert_still_serving(server):
    status, result = server.request("POST", "/v1/completions", {**COMPLETION, "max_tokens": 1},
                                    {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and result["usage"]["completion_tokens"] == 1, result
