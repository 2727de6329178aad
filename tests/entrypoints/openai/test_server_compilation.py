"""`jaxserve serve` with background compilation (its default): ready once the smallest
buckets are compiled, answering while the others compile, /metrics counting them down.

The server is the session's `api_server` (conftest.py), started with background compilation
for this test: its start-up log and its metrics since then are what is checked.
"""

import re
import time

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)
COMPLETION = {"model": "", "prompt": "the quick brown fox jumps over the lazy dog " * 4,
              "max_tokens": 8, "temperature": 0}


def test_the_server_answers_while_the_larger_buckets_compile(api_server):
    server = api_server
    ready = re.search(r"jaxserve is ready: .*\((max_model_len=\d+; )?(\d+) programs "
                      r"compiled, (\d+) compiling in the background\)", server.log())
    assert ready, server.log()[-2000:]
    compiled, pending = int(ready.group(2)), int(ready.group(3))
    assert compiled > 0 and pending > 0  # the smallest buckets only, at first
    status, body = server.request("POST", "/v1/completions",
                                  {**COMPLETION, "model": server_model(server)},
                                  {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 8
    deadline = time.monotonic() + 300
    while (metrics := server.metrics())["jaxserve:num_programs_pending"] > 0:
        assert time.monotonic() < deadline, "the background compilation did not finish"
        time.sleep(0.5)
    assert metrics["jaxserve:num_programs_compiled"] == compiled + pending
    assert metrics["jaxserve:num_compilations_after_warm_up_total"] == 0


def server_model(server) -> str:
    _, models = server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return models["data"][0]["id"]
