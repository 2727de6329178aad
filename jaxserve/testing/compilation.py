"""Counting XLA compilations, and a guard that turns any compilation into an error.

Both listen to JAX's own monitoring event for a backend compilation (a persistent-cache
hit counts too: it means the in-memory cache missed, i.e. a shape was new). After
warm-up the engine must never compile again; tests wrap their workloads in
`forbid_compilation()` to prove it.
"""

from __future__ import annotations

import contextlib
import threading

import jax

from jaxserve.runner.compiled_programs import COMPILE_THREAD

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompilationError(RuntimeError):
    """Raised by `forbid_compilation()` when XLA compiles inside the guarded block."""


class CompilationCounter:
    """Counts the compilations its owner triggers: those inside `track()` on the calling
    thread, so that two engines in one process never count each other's. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tracking = threading.local()
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    @contextlib.contextmanager
    def track(self):
        depth = getattr(self._tracking, "depth", 0)
        self._tracking.depth = depth + 1
        try:
            yield self
        finally:
            self._tracking.depth = depth

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT and getattr(self._tracking, "depth", 0):
            with self._lock:
                self.count += 1
                self.seconds += duration

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


@contextlib.contextmanager
def forbid_compilation():
    """Any XLA compilation inside the block raises `CompilationError` naming the function,
    except in an engine's background compilation thread (steps never wait for it)."""
    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT and threading.current_thread().name != COMPILE_THREAD:
            raise CompilationError(
                f"XLA compiled {kwargs.get('fun_name', '<unknown>')!r} inside forbid_compilation()")

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
