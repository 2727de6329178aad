"""Schema fuzzing: schemathesis generates requests from the live server's /openapi.json.

Valid and schema-violating bodies for every operation, a fixed seed, a bounded number per
operation (a larger run is slow). Every answer is a 2xx that matches the document (a stream
ends with [DONE]) or a 4xx with the OpenAI error body; none is a 5xx, none takes longer
than TIME_LIMIT; afterwards the server still answers and holds no request and no KV block.
The generated sizes that cost engine time (n, max_tokens) are capped here: the fuzzer is
after wrong answers, not long generations.
"""

import dataclasses
import json
import time

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               negative_data_rejection,
                                               response_schema_conformance,
                                               status_code_conformance)

API_KEY = "test-key"  # as api_server serves (conftest.API_SERVER_FLAGS)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEED = 20
TIME_LIMIT = 20.0  # seconds per request, on a loaded CI machine
CAPS = {"n": 2, "max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 2}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@dataclasses.dataclass
class FuzzReport:
    num_requests: int = 0
    seconds: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    def fail(self, case, response, why: str) -> None:
        body = response.text[:300] if response is not None else ""
        self.failures.append(f"{case.method} {case.path} {case.body!r:.300} "
                             f"-> {getattr(response, 'status_code', None)} {body}: {why}")


def cap_costs(case) -> bool:
    """Generation sizes down to CAPS; chat without a limit would run to the context end.
    True when a generated value was lowered: a schema-violating one (n past the server's
    maximum) may have become valid, so the answer no longer has to be a 4xx."""
    body = case.body
    if not isinstance(body, dict) or not case.path.startswith("/v1/"):
        return False
    lowered = False
    for name, cap in CAPS.items():
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[name] = cap
            lowered = True
    if case.path == "/v1/completions" and "max_tokens" in body and body["max_tokens"] is None:
        body["max_tokens"] = CAPS["max_tokens"]  # None: up to the context end
    if case.path == "/v1/chat/completions" and body.get("max_tokens") is None and body.get(
            "max_completion_tokens") is None:
        body["max_completion_tokens"] = CAPS["max_completion_tokens"]
    return lowered


def check_answer(report: FuzzReport, case, response, seconds: float, *,
                 lowered: bool = False) -> None:
    report.num_requests += 1
    report.seconds.append((seconds, f"{case.path} {case.body!r:.200}"))
    report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
    if seconds > TIME_LIMIT:
        report.fail(case, response, f"took {seconds:.1f} s")
    try:
        case.validate_response(response, checks=[
            c for c in CHECKS if not (lowered and c is negative_data_rejection)])
    except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - schemathesis' failures
        report.fail(case, response, " / ".join(str(error).splitlines()[:3]))
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert isinstance(error["message"], str) and isinstance(error["code"], str)
        except (ValueError, KeyError, TypeError, AssertionError):
            report.fail(case, response, "not an OpenAI error body")
    elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any(
                "error" in json.loads(e) for e in events[:-1]):
            report.fail(case, response, "a stream that does not end well")


def fuzz(server, *, examples_per_operation: int, seed: int = SEED) -> FuzzReport:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.body:  # a body-less GET has nothing to get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @hypothesis.seed(seed)
            @hypothesis.settings(max_examples=examples_per_operation, deadline=None,
                                 database=None, phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def one(case):
                lowered = cap_costs(case)
                started = time.monotonic()
                try:
                    response = case.call(base_url=server.url, headers=AUTH, timeout=TIME_LIMIT)
                except Exception as error:  # noqa: BLE001 - a hang or a dropped connection
                    report.num_requests += 1
                    report.fail(case, None, f"no answer: {error!r}")
                    return
                check_answer(report, case, response, time.monotonic() - started,
                             lowered=lowered)

            one()
    return report


def assert_server_sound(server, report: FuzzReport) -> None:
    assert not report.failures, "\n".join(report.failures[:20])
    status, body = server.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3},
                                  AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] == 3, body
    metrics = server.wait_idle()
    assert metrics["jaxserve:num_requests_running"] == 0
    assert metrics["jaxserve:num_requests_waiting"] == 0
    assert metrics["jaxserve:kv_cache_usage_perc"] == 0


def test_fuzzed_requests_get_2xx_or_an_openai_4xx_and_leave_nothing_behind(api_server):
    report = fuzz(api_server, examples_per_operation=3)
    assert report.num_requests >= 25 and 200 in report.statuses and 400 in report.statuses
    assert_server_sound(api_server, report)


@pytest.mark.slow
def test_a_longer_fuzz_run_finds_no_server_error(api_server):
    report = fuzz(api_server, examples_per_operation=300, seed=SEED + 1)
    assert report.num_requests >= 2000, report.statuses
    assert_server_sound(api_server, report)
