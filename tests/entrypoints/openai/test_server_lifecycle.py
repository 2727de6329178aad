"""The server under pressure and at the end of its life: more samples than may wait is a
400 that leaves it serving (slow); SIGTERM lets an in-flight stream finish and exits 0.
"""

import json
import signal
import urllib.request

import pytest


@pytest.fixture(scope="module")
def small_queue_server(start_server):
    server = start_server("--max-num-waiting", "20")
    yield server
    assert server.stop() == 0, server.log()


# Slow (a server start of its own): the default run has the scheduler's refusal beyond
# max_num_waiting (tests/core/test_scheduler.py) and the app's 503 for it, the queued requests
# still finishing (tests/entrypoints/openai/test_app.py); a flood past it against a real
# server is in test_server_overload.py.
@pytest.mark.slow
def test_more_samples_than_may_wait_is_400_and_the_server_keeps_serving(small_queue_server):
    body = {"prompt": "Hello", "max_tokens": 4, "n": 24}  # 24 samples, 20 may wait: never
    status, result = small_queue_server.request("POST", "/v1/completions", body)
    assert status == 400 and result["error"]["param"] == "n", result
    assert "max_num_waiting=20" in result["error"]["message"]
    status, result = small_queue_server.request("POST", "/v1/completions", {**body, "n": 20})
    assert status == 200 and len(result["choices"]) == 20
    assert small_queue_server.wait_idle()["jaxserve:kv_cache_usage_perc"] == 0


def test_sigterm_lets_the_in_flight_stream_finish_and_exits_0(plain_server):
    server = plain_server
    request = urllib.request.Request(
        server.url + "/v1/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": "Hello", "max_tokens": 200, "n": 8, "stream": True,
                         "ignore_eos": True}).encode())
    finishes = []
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()
        assert first.startswith(b"data: {")
        server.process.send_signal(signal.SIGTERM)
        events = [line for line in response.read().split(b"\n\n") if line.startswith(b"data:")]
    for event in events[:-1]:
        choice = json.loads(event[len(b"data: "):])["choices"][0]
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    assert events[-1] == b"data: [DONE]" and finishes == ["length"] * 8
    assert server.stop(sig=None) == 0, server.log()
    assert "shutting down" in server.log()
