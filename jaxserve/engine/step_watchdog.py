"""A watchdog over the engine thread's steps: one that runs past `timeout` seconds is hung.

The engine thread calls `started()` before a step and `finished()` after it; a daemon
thread checks a few times per timeout and calls `on_hang(seconds)` once if a step is still
running past it (a device that stopped answering, a collective waiting for a dead peer).
The watchdog cannot stop the step; `on_hang` turns the engine dead around it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StepWatchdog:
    def __init__(self, timeout: float, on_hang: Callable[[float], None]):
        if not timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self._on_hang = on_hang
        self._lock = threading.Lock()
        self._step_start: float | None = None  # time.monotonic() of the running step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxserve-step-watchdog",
                                        daemon=True)
        self._thread.start()

    def started(self) -> None:
        with self._lock:
            self._step_start = time.monotonic()

    def finished(self) -> None:
        with self._lock:
            self._step_start = None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            with self._lock:
                start = self._step_start
            if start is not None and time.monotonic() - start > self.timeout:
                self._on_hang(time.monotonic() - start)
                return
