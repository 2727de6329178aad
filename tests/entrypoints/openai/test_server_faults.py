"""Injected engine faults against a real server (core/faults.py's JAXSERVE_INJECT_FAULT).

A step that raises (in the forward or in the sampler) or hangs past --step-timeout kills
the engine: the requests in it get a 500 (an OpenAI body, or in-band then [DONE] for a
stream), /health and new requests a quick 503, and the process exits with status 1 within
its grace period. A request whose detokenization raises fails alone; the server goes on.
Each test starts its own server, so they are slow.
"""

import concurrent.futures
import json
import time
import urllib.request

import pytest

from jaxserve.core.faults import ENV_VAR

pytestmark = pytest.mark.slow
LONG = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True}


def stream_events(server, body: dict) -> list[str]:
    """The `data:` payloads of one streamed completion, in order."""
    req = urllib.request.Request(server.url + "/v1/completions",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.status == 200
        lines = response.read().decode().splitlines()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def in_flight_pair(server) -> tuple[list[str], tuple[int, object]]:
    """A streamed and a plain long completion sent together: (stream events, (status, body))."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream_events, server, LONG)
        plain = pool.submit(server.request, "POST", "/v1/completions", LONG)
        return streamed.result(), plain.result()


@pytest.mark.parametrize("spec,flags", [
    ("forward:raise@30", ()),
    ("sampler:raise@30", ()),
    ("forward:hang@30", ("--step-timeout", "2")),
])
def test_a_failed_step_fails_its_requests_then_503s_and_the_process_exits_1(
        start_server, spec, flags):
    server = start_server(*flags, env={ENV_VAR: spec})
    try:
        events, (status, body) = in_flight_pair(server)
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert error["code"] == "500" and error["type"] == "internal_server_error"
        assert all("choices" in json.loads(e) for e in events[:-2])  # tokens before it
        assert status == 500 and body["error"]["type"] == "internal_server_error", body
        started = time.monotonic()
        health, _ = server.request("GET", "/health")
        late, late_body = server.request("POST", "/v1/completions", {"prompt": "Hi"})
        assert health == 503 and late == 503 and late_body["error"]["code"] == "503"
        assert time.monotonic() - started < 2
        assert server.stop(sig=None, timeout=30) == 1, server.log()
        assert "a supervisor should restart it" in server.log()
    finally:
        server.stop()


def test_a_request_whose_detokenizer_raises_fails_alone(start_server):
    server = start_server(env={ENV_VAR: "detokenize:raise@40"})
    try:
        events, (status, body) = in_flight_pair(server)
        outcomes = sorted([json.loads(events[-2]).get("error", {}).get("code", "ok"),
                           str(status) if status != 200 else "ok"])
        assert outcomes == ["500", "ok"], (events[-3:], status, body)  # exactly one failed
        assert events[-1] == "[DONE]"
        health, _ = server.request("GET", "/health")
        status, body = server.request("POST", "/v1/completions", {"prompt": "Hi",
                                                                  "max_tokens": 4})
        assert health == 200 and status == 200 and len(body["choices"][0]["text"]) > 0
        metrics = server.wait_idle()
        assert metrics["jaxserve:kv_cache_usage_perc"] == 0
        assert metrics["jaxserve:num_requests_running"] == 0
    finally:
        assert server.stop() == 0, server.log()
