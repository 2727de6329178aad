"""AsyncEngine: outputs reach asyncio, errors reach callers, cancellation aborts, death spreads.

A scripted stand-in for LLMEngine (one token per request per step) keeps these tests fast
and lets them make the engine fail on purpose; the server tests run the real engine.
"""

import asyncio
import threading
import time
import types

import pytest

from jaxserve.core.scheduler import WaitingQueueFullError
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.errors import (EngineDeadError, EngineFailedRequestError, RequestAbortedError,
                                    RequestFailedError)
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams


class ScriptedEngine:
    """Each step gives every live request one token; `max_tokens` ends it ("length")."""

    def __init__(self, *, max_waiting=None, step_seconds=0.0):
        self.tokenizer = None
        self.model_config = types.SimpleNamespace(max_model_len=64, vocab_size=100)
        self.live: dict[str, tuple[RequestOutput, SamplingParams]] = {}
        self.aborted: list[str] = []
        self.fail_next_step = threading.Event()
        self.hang_next_step = threading.Event()  # the step blocks until `unhang` is set
        self.unhang = threading.Event()
        self.fail_request_ids: set[str] = set()  # dropped at the next step, as failed
        self.failed: dict[str, Exception] = {}
        self.max_waiting = max_waiting
        self.step_seconds = step_seconds
        self.thread_ids: set[int] = set()

    def add_request(self, request_id, prompt_token_ids, params, *, prompt=None,
                    arrival_time=None, priority=0, cache_salt=None):
        self.thread_ids.add(threading.get_ident())
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if self.max_waiting is not None and len(self.live) >= self.max_waiting:
            raise WaitingQueueFullError("full")
        sample = CompletionOutput(0, "", [], None, None)
        self.live[request_id] = (RequestOutput(request_id, prompt, prompt_token_ids, None,
                                               [sample], False), params)
        return request_id

    def abort_request(self, request_ids):
        self.thread_ids.add(threading.get_ident())
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            if self.live.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self, on_outputs=None):  # hands outputs over early, as LLMEngine does
        self.thread_ids.add(threading.get_ident())
        if self.fail_next_step.is_set():
            raise RuntimeError("device fell over")
        if self.hang_next_step.is_set():
            self.unhang.wait()
        time.sleep(self.step_seconds)
        for request_id in self.fail_request_ids & set(self.live):
            del self.live[request_id]
            self.failed[request_id] = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        outputs = []
        for request_id, (output, params) in list(self.live.items()):
            sample = output.outputs[0]
            sample.token_ids.append(len(sample.token_ids) + 1)
            sample.text += "x"
            if len(sample.token_ids) == params.max_tokens:
                sample.finish_reason, output.finished = "length", True
                del self.live[request_id]
            outputs.append(output)
        if on_outputs is not None:
            on_outputs(outputs)
            return []
        return outputs

    def pop_failed_requests(self):
        failed, self.failed = self.failed, {}
        return failed

    def get_stats(self):
        return {"num_running": len(self.live), "num_waiting": 0, "kv_cache_usage": 0.0}


class Recorder:
    def __init__(self):
        self.first, self.inter, self.done = [], [], []

    def on_first_token(self, seconds):
        self.first.append(seconds)

    def on_inter_token(self, seconds):
        self.inter.append(seconds)

    def on_request_done(self, seconds, finish_reasons):
        self.done.append(finish_reasons)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.fixture
def scripted():
    engine = ScriptedEngine()
    async_engine = AsyncEngine(engine)
    yield engine, async_engine
    async_engine.shutdown()


async def collect(async_engine, request_id, max_tokens, prompt=(1, 2)):
    return [o async for o in async_engine.generate(request_id, list(prompt),
                                                   SamplingParams(max_tokens=max_tokens))]


def test_generate_yields_cumulative_outputs_until_finished(scripted):
    engine, async_engine = scripted
    outputs = run(collect(async_engine, "a", 4))
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == [1, 2, 3, 4]
    assert all(not o.finished for o in outputs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths)  # snapshots: later steps never change earlier ones


def test_engine_runs_on_its_own_thread(scripted):
    engine, async_engine = scripted
    run(collect(async_engine, "a", 2))
    assert engine.thread_ids == {async_engine._thread.ident}


def test_concurrent_requests_all_finish(scripted):
    _, async_engine = scripted

    async def many():
        return await asyncio.gather(*(collect(async_engine, f"r{i}", 3 + i % 4)
                                      for i in range(20)))

    results = run(many())
    assert [len(r[-1].outputs[0].token_ids) for r in results] == [3 + i % 4 for i in range(20)]


def test_rejected_request_raises_to_the_caller_and_engine_keeps_serving(scripted):
    _, async_engine = scripted
    with pytest.raises(ValueError, match="prompt must not be empty"):
        run(collect(async_engine, "bad", 2, prompt=()))
    assert run(collect(async_engine, "good", 2))[-1].finished


def test_waiting_queue_full_error_reaches_the_caller():
    engine = ScriptedEngine(max_waiting=1, step_seconds=0.01)
    async_engine = AsyncEngine(engine)

    async def two():
        first = await async_engine.add_request("a", [1], SamplingParams(max_tokens=50))
        with pytest.raises(WaitingQueueFullError):
            await async_engine.add_request("b", [1], SamplingParams(max_tokens=5))
        async_engine.abort(first.request_id)

    run(two())
    async_engine.shutdown()


def test_cancelling_generate_aborts_the_request():
    engine = ScriptedEngine(step_seconds=0.005)
    async_engine = AsyncEngine(engine)

    async def cancel_midway():
        async def consume():
            async for _ in async_engine.generate("slow", [1], SamplingParams(max_tokens=10_000)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while engine.live:
            await asyncio.sleep(0.01)

    run(cancel_midway())
    assert engine.aborted == ["slow"]
    async_engine.shutdown()


def test_abort_ends_a_stream_that_is_still_being_read(scripted):
    engine, async_engine = scripted
    engine.step_seconds = 0.005

    async def abort_while_reading():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        async_engine.abort("r")
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass

    run(abort_while_reading())


def test_slow_reader_skips_to_the_newest_output(scripted):
    engine, async_engine = scripted

    async def slow():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=30))
        while engine.live:  # let the engine finish before reading anything
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return [o async for o in stream]

    outputs = run(slow())
    assert len(outputs) == 1 and outputs[0].finished
    assert len(outputs[0].outputs[0].token_ids) == 30


def test_engine_death_fails_live_requests_and_refuses_new_ones():
    engine = ScriptedEngine(step_seconds=0.005)
    async_engine = AsyncEngine(engine)

    async def die_midway():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        engine.fail_next_step.set()
        with pytest.raises(EngineDeadError, match="device fell over"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", [1], SamplingParams())

    run(die_midway())
    assert not async_engine.is_alive


def test_requests_live_when_the_engine_dies_fail_and_death_callbacks_run_once():
    engine = ScriptedEngine(step_seconds=0.005)
    async_engine = AsyncEngine(engine)
    deaths = []
    async_engine.on_death.append(deaths.append)

    async def die_midway():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        engine.fail_next_step.set()
        with pytest.raises(EngineFailedRequestError):  # a 500 for it, 503s for later ones
            async for _ in stream:
                pass

    run(die_midway())
    assert len(deaths) == 1 and isinstance(deaths[0], EngineFailedRequestError)


def test_a_hung_step_past_the_timeout_kills_the_engine():
    engine = ScriptedEngine(step_seconds=0.005)
    async_engine = AsyncEngine(engine, step_timeout=0.3)
    deaths = []
    async_engine.on_death.append(deaths.append)

    async def hang_midway():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        engine.hang_next_step.set()
        started = time.monotonic()
        with pytest.raises(EngineFailedRequestError, match="hung"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", [1], SamplingParams())
        return time.monotonic() - started

    try:
        assert run(hang_midway()) < 5
        assert not async_engine.is_alive and len(deaths) == 1
    finally:
        engine.unhang.set()  # the engine thread then sees it is dead and ends
    async_engine.shutdown()


def test_a_request_failed_in_the_engine_errors_alone():
    engine = ScriptedEngine(step_seconds=0.002)
    async_engine = AsyncEngine(engine)

    async def one_fails():
        bad = await async_engine.add_request("bad", [1], SamplingParams(max_tokens=20))
        good = await async_engine.add_request("good", [1], SamplingParams(max_tokens=20))
        engine.fail_request_ids.add("bad")
        with pytest.raises(RequestFailedError, match="bad byte") as error:
            async for _ in bad:
                pass
        assert not isinstance(error.value, EngineDeadError)
        return [o async for o in good][-1]

    last = run(one_fails())
    assert last.finished and len(last.outputs[0].token_ids) == 20 and async_engine.is_alive
    async_engine.shutdown()


def test_observer_sees_first_token_inter_token_and_end(scripted):
    _, async_engine = scripted
    recorder = Recorder()
    async_engine.observer = recorder
    run(collect(async_engine, "a", 5))
    assert len(recorder.first) == 1 and len(recorder.inter) == 4
    assert recorder.done == [["length"]]


def test_shutdown_ends_live_requests_with_an_error():
    engine = ScriptedEngine(step_seconds=0.005)
    async_engine = AsyncEngine(engine)

    async def shut_down_midway():
        stream = await async_engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    run(shut_down_midway())


def test_a_grammar_compiles_off_the_engine_thread_and_a_bad_one_is_never_queued(scripted):
    from jaxserve.sampling_params import StructuredOutputsParams

    engine, async_engine = scripted
    compiled_on = []

    def compile_grammar(spec):  # the engine's StructuredOutputs.compile
        compiled_on.append(threading.current_thread().name)
        if spec.regex == "(":
            raise ValueError("structured_outputs: invalid regex: unclosed group")
        return "grammar"

    engine.structured_outputs = types.SimpleNamespace(compile=compile_grammar)
    good = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))
    outputs = run(async_engine.generate("g", [1, 2], good).__anext__())
    assert outputs.request_id == "g" and compiled_on[0] not in ("jaxserve-engine",
                                                                 threading.main_thread().name)
    bad = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="("))
    with pytest.raises(ValueError, match="unclosed group"):
        run(async_engine.add_request("b", [1, 2], bad))
    assert "b" not in engine.live and "b" not in engine.aborted
