"""A guard that turns any XLA compilation into an error.

It listens to JAX's own monitoring event for a backend compilation, as the engine's
`runner.compilation_counter.CompilationCounter` does (a persistent-cache hit counts too:
it means the in-memory cache missed, i.e. a shape was new). After warm-up the engine must
never compile again; tests wrap their workloads in `forbid_compilation()` to prove it.
"""

from __future__ import annotations

import contextlib
import threading

import jax

from jaxserve.runner.compilation_counter import COMPILE_EVENT, CompilationCounter
from jaxserve.runner.compiled_programs import COMPILE_THREAD

__all__ = ["COMPILE_EVENT", "CompilationCounter", "CompilationError", "forbid_compilation"]


class CompilationError(RuntimeError):
    """Raised by `forbid_compilation()` when XLA compiles inside the guarded block."""


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
