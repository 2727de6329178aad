"""Counting the XLA compilations an engine triggers (a production metric: the compile count
after warm-up must stay 0, and `/metrics` reports it).

It listens to JAX's own monitoring event for a backend compilation; a persistent-cache hit
counts too (the in-memory cache missed: a shape was new).
"""

from __future__ import annotations

import contextlib
import threading

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


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
