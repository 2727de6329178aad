"""AsyncEngine: an `LLMEngine` driven by one thread, consumed from asyncio.

Requests and aborts go into a thread-safe inbox; the engine thread drains it, runs `step()`
while there is work (JAX releases the GIL while it computes) and hands each request's
outputs to that request's asyncio queue with `loop.call_soon_threadsafe`. It owns the
per-request timestamps (TTFT, inter-token latency, end-to-end) and reports them to an
optional observer. A request the engine drops alone (its output failed) gets
`RequestFailedError`; if the thread dies (a step raised, or hung past `step_timeout`), every
live request gets `EngineFailedRequestError`, later ones `EngineDeadError`, and the
`on_death` callbacks run (the server exits so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from typing import Any, Protocol

from jaxserve.engine.errors import (EngineDeadError, EngineFailedRequestError,  # noqa: F401
                                    RequestAbortedError, RequestFailedError)
from jaxserve.engine.step_watchdog import StepWatchdog
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """What the engine thread reports per request (the server's metrics implement it)."""

    def on_first_token(self, seconds: float) -> None: ...  # arrival -> first output token

    def on_inter_token(self, seconds: float) -> None: ...  # one per step that added tokens

    def on_request_done(self, seconds: float, finish_reasons: list[str]) -> None: ...


class RequestStream:
    """One request's cumulative outputs, newest wins: a slow reader skips stale snapshots."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished = False  # the last output (finished=True) or an error was read
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending_error: BaseException | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event-loop thread only (the engine thread goes through call_soon_threadsafe)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = self._pending_error or await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            newer = self._queue.get_nowait()
            if isinstance(newer, BaseException):
                self._pending_error = newer
                break
            item = newer
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


@dataclasses.dataclass
class _Live:
    """Engine-thread bookkeeping for one request."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    arrival: float  # time.monotonic() when the request entered the inbox
    num_samples: int  # n: an abort ends this many samples
    last_token_time: float | None = None  # None until the first output token
    num_tokens: int = 0  # output tokens over all samples, as last delivered


@dataclasses.dataclass
class _Add:
    request_id: str
    args: tuple  # (prompt_token_ids, params)
    kwargs: dict[str, Any]  # prompt, arrival_time, priority, cache_salt
    live: _Live
    accepted: asyncio.Future  # resolved once the engine validated and queued it


class AsyncEngine:
    def __init__(self, engine, *, observer: EngineObserver | None = None,
                 step_timeout: float | None = None):
        """`step_timeout`: seconds after which a running step counts as hung (None: never)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.observer = observer
        self.stats: dict[str, float] = engine.get_stats()  # refreshed by the engine thread
        self.dead_error: BaseException | None = None  # set once the thread has ended
        self._cond = threading.Condition()
        self._inbox: list[_Add | str] = []  # _Add, or a request id to abort
        self._in_hand: list[_Add | str] = []  # taken from the inbox, not yet handled
        self._stopping = False
        # Engine thread, and the watchdog once it declares the engine dead.
        self._live: dict[str, _Live] = {}
        self._live_lock = threading.Lock()
        # Called once, from the thread that found the engine dead, with its error.
        self.on_death: list[Callable[[EngineDeadError], None]] = []
        self._watchdog = None if step_timeout is None else StepWatchdog(step_timeout,
                                                                        self._hung)
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side ----------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.dead_error is None

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, *, prompt: str | None = None,
                          arrival_time: float | None = None, priority: int = 0,
                          cache_salt: str | None = None) -> RequestStream:
        """Queues a request once the engine accepted it: raises what `LLMEngine.add_request`
        raises (ValueError, WaitingQueueFullError) or EngineDeadError."""
        loop = asyncio.get_running_loop()
        grammars = getattr(self.engine, "structured_outputs", None)
        if params.structured_outputs is not None and grammars is not None:
            # compiled off the step loop (a worker thread): the engine's add finds it cached
            await loop.run_in_executor(None, grammars.compile, params.structured_outputs)
        stream = RequestStream(request_id)
        item = _Add(request_id, (list(prompt_token_ids), params),
                    dict(prompt=prompt, arrival_time=arrival_time, priority=priority,
                         cache_salt=cache_salt),
                    _Live(stream, loop, time.monotonic(), params.n), loop.create_future())
        self._post(item)
        try:
            await asyncio.shield(item.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # queued behind the add, so it cannot leak
            raise
        return stream

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, **kwargs) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until finished; leaving early (cancel, break) aborts it."""
        stream = await self.add_request(request_id, prompt_token_ids, params, **kwargs)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe; frees the request's blocks at the engine's next turn."""
        try:
            self._post(request_id)
        except EngineDeadError:
            pass

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the thread; live requests end with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.dead_error is None or not self._thread.is_alive():
            self._thread.join(timeout)  # (a thread the watchdog gave up on never ends)
        if self._watchdog is not None:
            self._watchdog.stop()

    def _post(self, item: _Add | str) -> None:
        with self._cond:
            if self.dead_error is not None or self._stopping:
                raise EngineDeadError(f"the engine is not running: {self.dead_error}"
                                      if self.dead_error else "the engine is shutting down")
            self._inbox.append(item)
            self._cond.notify()

    def compilation_stats(self) -> dict[str, int]:
        """Programs compiled so far and still to compile (in the background); read at any
        time, also while the engine thread is idle."""
        return self.engine.compilation_stats()

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping
                               or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    self._in_hand, self._inbox = self._inbox, []
                    stopping = self._stopping
                while self._in_hand:
                    self._handle(self._in_hand.pop(0))
                if stopping:
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                if self.dead_error is not None:  # the watchdog gave up on this thread
                    return
                self.stats = self.engine.get_stats()
            self._die(EngineDeadError("the engine was shut down"))
        except BaseException as error:  # noqa: BLE001 - every failure must reach the clients
            logger.exception("the engine thread died")
            self._die(EngineFailedRequestError(f"the engine thread died: {error!r}"))

    def _step(self) -> None:
        if self._watchdog is not None:
            self._watchdog.started()
        # the previous step's outputs reach clients while this one computes
        self._dispatch(self.engine.step(on_outputs=self._dispatch))
        if self._watchdog is not None:
            self._watchdog.finished()
        for request_id, error in self.engine.pop_failed_requests().items():
            with self._live_lock:
                live = self._live.pop(request_id, None)
            if live is not None:
                self._deliver(live, RequestFailedError(
                    f"request {request_id} failed in the engine: {error!r}"))
                self._report_done(live, ["error"] * live.num_samples)

    def _hung(self, seconds: float) -> None:
        """The watchdog's thread: the step in flight will not end; the engine is dead."""
        logger.error("an engine step has run for %.0f s (step timeout %.0f s): the engine is "
                     "considered dead", seconds, self._watchdog.timeout)
        self._die(EngineFailedRequestError(f"an engine step hung for over {seconds:.0f} s"))

    def _handle(self, item: _Add | str) -> None:
        if isinstance(item, str):
            self.engine.abort_request(item)
            with self._live_lock:
                live = self._live.pop(item, None)
            if live is not None:
                self._deliver(live, RequestAbortedError(f"request {item} was aborted"))
                self._report_done(live, ["abort"] * live.num_samples)
            return
        try:
            self.engine.add_request(item.request_id, *item.args, **item.kwargs)
        except Exception as error:  # ValueError, WaitingQueueFullError: the caller's to report
            _resolve(item.live.loop, item.accepted, error)
            return
        with self._live_lock:
            self._live[item.request_id] = item.live
        _resolve(item.live.loop, item.accepted, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        with self._live_lock:
            self._dispatch_locked(outputs)

    def _dispatch_locked(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:
                continue
            num_tokens = sum(len(o.token_ids) for o in output.outputs)
            if num_tokens > live.num_tokens and self.observer is not None:
                if live.last_token_time is None:
                    self.observer.on_first_token(now - live.arrival)
                else:
                    self.observer.on_inter_token(now - live.last_token_time)
            if num_tokens > live.num_tokens:
                live.last_token_time, live.num_tokens = now, num_tokens
            if output.finished:  # recorded before the client can see the end
                del self._live[output.request_id]
                self._report_done(live, [o.finish_reason for o in output.outputs])
            self._deliver(live, _snapshot(output))

    def _report_done(self, live: _Live, finish_reasons: list[str]) -> None:
        if self.observer is not None:
            self.observer.on_request_done(time.monotonic() - live.arrival, finish_reasons)

    def _deliver(self, live: _Live, item: RequestOutput | BaseException) -> None:
        try:
            live.loop.call_soon_threadsafe(live.stream.put, item)
        except RuntimeError:  # the event loop is closed: nobody is reading
            pass

    def _die(self, error: EngineDeadError) -> None:
        """Live requests get `error`; requests not yet accepted, and later ones, an
        EngineDeadError (503: none of them reached the engine)."""
        with self._cond:
            if self.dead_error is not None:  # the watchdog and the engine thread both
                return
            self.dead_error = error
            pending, self._inbox = self._in_hand + self._inbox, []
        for callback in self.on_death:  # first: whoever sees an error, sees a dead engine
            callback(error)
        refused = EngineDeadError(str(error))
        for item in pending:
            if isinstance(item, _Add):
                _resolve(item.live.loop, item.accepted, refused)
        with self._live_lock:
            lives, self._live = list(self._live.values()), {}
        for live in lives:
            self._deliver(live, error)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future,
             error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy the engine thread will not mutate (it extends its lists in place each step)."""
    samples = [CompletionOutput(o.index, o.text, list(o.token_ids), o.cumulative_logprob,
                                None if o.logprobs is None else list(o.logprobs),
                                o.finish_reason, o.stop_reason) for o in output.outputs]
    prompt_logprobs = None if output.prompt_logprobs is None else list(output.prompt_logprobs)
    return RequestOutput(output.request_id, output.prompt, output.prompt_token_ids,
                         prompt_logprobs, samples, output.finished, output.num_cached_tokens)
