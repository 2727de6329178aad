"""Servers for the tests: a real `jaxserve serve` subprocess, or the app over a script.

`start_server(*flags)` launches the tiny qwen2 checkpoint with small engine budgets (a few
seconds of warm-up, cached on disk for the session) and waits for /health; `ServerProcess`
knows its URL, reads /metrics, and stops the process (checking how it exited); `api_server`
is one such server shared by the API tests, launched with `plain_server` (for the SIGTERM
test) so that the two start at once.
`scripted.serve(test)` runs `await test(client, engine)` against `build_app` in-process over
`ScriptedEngine`, which answers every prompt with one fixed text and made-up logprobs.
"""

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.core.scheduler import WaitingQueueFullError
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.step_stats import StepStats
from jaxserve.entrypoints.openai.api_server import build_app
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput

# Every bucket compiled before the server reports ready (the background compilation has
# its own test); the budgets of tests/conftest.py's ENGINE_KWARGS, whose programs the
# session's compilation cache holds.
SMALL_ENGINE = ("--max-num-seqs", "16", "--max-num-batched-tokens", "128",
                "--no-background-compilation")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint, flags, *, log_path, cache_dir, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # This process's XLA_FLAGS (8 host devices; the server uses one): with them the
        # session's compilation cache has the programs of qwen2_llm, which has these budgets.
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
        cmd = [sys.executable, "-m", "jaxserve.entrypoints.cli", "serve", str(checkpoint),
               "--port", str(self.port), "--compilation-cache-dir", str(cache_dir), *flags]
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        self.waited_ready = True
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server was not ready after {timeout} s:\n{self.log()}")

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict | None = None) -> tuple[int, object]:
        """(status, parsed JSON or text) of one raw HTTP request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name, summed over labels, and by `name{reason}` for
        samples labelled with a finished_reason."""
        _, text = self.request("GET", "/metrics")
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
                reason = sample.labels.get("finished_reason")
                if reason is not None:
                    samples[f"{sample.name}{{{reason}}}"] = sample.value
        return samples

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """The metrics once no request runs or waits and no KV block is held."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            idle = (metrics["jaxserve:num_requests_running"] == 0
                    and metrics["jaxserve:num_requests_waiting"] == 0
                    and metrics["jaxserve:kv_cache_usage_perc"] == 0)
            if idle or time.monotonic() > deadline:
                return metrics
            time.sleep(0.05)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends `sig` (None: none, it was sent already) and returns the exit status; kills
        the process if it has not exited after `timeout` seconds."""
        if self.process.poll() is None and sig is not None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def compilation_cache_dir(shared_compilation_cache):
    return shared_compilation_cache


@pytest.fixture(scope="session")
def launch_server(engine_checkpoint, compilation_cache_dir, tmp_path_factory):
    """`launch_server(*flags, env=None) -> ServerProcess` serving the tiny qwen2 checkpoint,
    started (`wait_ready()` waits for it); `env` adds environment variables."""
    def launch(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        return ServerProcess(engine_checkpoint("qwen2"), [*SMALL_ENGINE, *flags],
                             log_path=log_path, cache_dir=compilation_cache_dir, env=env)

    return launch


@pytest.fixture(scope="session")
def start_server(launch_server):
    """`start_server(*flags) -> ServerProcess` serving the tiny qwen2 checkpoint, ready."""
    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = launch_server(*flags, env=env)
        server.wait_ready()
        return server

    return start


# The served name and key of `api_server`, which the API tests use; background compilation
# on (the serve default), which test_server_compilation.py checks from the start-up log.
API_SERVER_FLAGS = ("--served-model-name", "tiny-qwen2", "--api-key", "test-key",
                    "--max-request-body-bytes", "1MiB", "--background-compilation")


@pytest.fixture(scope="session")
def session_servers(launch_server):
    """The server the API tests share and a plain one that the SIGTERM test stops, launched
    together so that their start-ups overlap (one core each); each test waits for its own."""
    servers = types.SimpleNamespace(api=launch_server(*API_SERVER_FLAGS),
                                    plain=launch_server())
    yield servers
    for server in (servers.api, servers.plain):  # the plain one may have exited already
        status = server.stop()
        # a server no test waited for may still be starting: SIGTERM then ends it early
        assert status == 0 or not getattr(server, "waited_ready", False), server.log()


@pytest.fixture(scope="session")
def api_server(session_servers):
    """One server for the API tests (test_server.py, test_server_errors.py,
    test_server_compilation.py): they read its metrics as differences, so they can share
    its start-up."""
    session_servers.api.wait_ready()
    return session_servers.api


@pytest.fixture
def plain_server(session_servers):
    """A server with the default flags, ready, for a test that ends it."""
    session_servers.plain.wait_ready()
    return session_servers.plain


ANSWER = " the quick brown fox"
TOP_LOGPROBS = (-0.25, -1.5, -math.inf)  # ranks 1, 2, 3; the chosen token is rank 2


class ScriptedEngine:
    """Answers every prompt with ANSWER, one token per step, with made-up logprobs; can
    pause (steps do nothing), fail (a step raises) and cap its live requests."""

    def __init__(self, tokenizer, *, max_waiting=None, answer=ANSWER, max_model_len=64,
                 step_seconds=0.0):
        self.tokenizer = tokenizer
        self.step_seconds = step_seconds  # > 0: a stream gets its answer in many chunks
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len,
                                                  vocab_size=len(tokenizer))
        self.answer_ids = tokenizer.encode(answer)
        self.live = {}
        self.max_waiting = max_waiting
        self.fail = threading.Event()
        self.paused = threading.Event()
        self.step_stats = StepStats()  # the dashboard's: no step is recorded

    def position(self, chosen):
        decode = self.tokenizer.decode
        entries = {chosen: Logprob(TOP_LOGPROBS[1], 2, decode([chosen]))}
        for rank, (tid, lp) in enumerate(zip((7, chosen, 9), TOP_LOGPROBS), 1):
            entries.setdefault(tid, Logprob(lp, rank, decode([tid])))
        return entries

    def add_request(self, request_id, ids, params, *, prompt=None, **kwargs):
        if self.max_waiting is not None and len(self.live) >= self.max_waiting:
            raise WaitingQueueFullError("2 requests are already waiting")
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [self.position(t) for t in ids[1:]]
        samples = [CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                    [] if params.logprobs is not None else None)
                   for i in range(params.n)]
        self.live[request_id] = (RequestOutput(request_id, prompt, ids, prompt_lps, samples,
                                               False), params)

    def abort_request(self, request_ids):
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.live.pop(request_id, None)

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self, on_outputs=None):  # returns its outputs (LLMEngine may do either)
        del on_outputs
        if self.fail.is_set():
            raise RuntimeError("device fell over")
        if self.paused.is_set():
            time.sleep(0.005)
            return []
        time.sleep(self.step_seconds)
        outputs = []
        for request_id, (output, params) in list(self.live.items()):
            for sample in output.outputs:
                token = self.answer_ids[len(sample.token_ids)]
                sample.token_ids.append(token)
                sample.text = self.tokenizer.decode(sample.token_ids)
                if sample.logprobs is not None:
                    sample.logprobs.append(self.position(token))
                if len(sample.token_ids) == min(params.max_tokens, len(self.answer_ids)):
                    sample.finish_reason = "length"
            output.finished = all(s.finish_reason for s in output.outputs)
            if output.finished:
                del self.live[request_id]
            outputs.append(output)
        return outputs

    def pop_failed_requests(self):
        return {}

    def get_stats(self):
        return {"num_running": len(self.live)}

    def block_states(self):  # a pool of 8 free blocks, for the dashboard
        return bytearray(8)

    def compilation_stats(self):
        return {"num_programs_compiled": 0, "num_programs_pending": 0}


class ScriptedApp:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.answer = ANSWER

    def engine(self, **kwargs) -> ScriptedEngine:
        return ScriptedEngine(self.tokenizer, **kwargs)

    def serve(self, test, *, app_kwargs=None, **engine_kwargs):
        """`await test(client, engine)` against a fresh app over a fresh ScriptedEngine."""
        engine = self.engine(**engine_kwargs)
        async_engine = AsyncEngine(engine)

        async def main():
            app = build_app(async_engine, served_model_names=["scripted"], **(app_kwargs or {}))
            client = TestClient(TestServer(app, handler_cancellation=True))
            await client.start_server()
            try:
                return await asyncio.wait_for(test(client, engine), 20)
            finally:
                await client.close()

        try:
            return asyncio.run(main())
        finally:
            async_engine.shutdown()


@pytest.fixture(scope="session")
def scripted():
    """The ScriptedApp over the test BPE tokenizer (trained once per session)."""
    from jaxserve.testing.tokenizer import build_tokenizer

    return ScriptedApp(build_tokenizer())
