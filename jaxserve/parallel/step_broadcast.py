"""Multi-host serving: process 0 schedules, every process runs the same step on its devices.

Before each `runner.execute`, process 0 pickles the step's `SchedulerOutput` and broadcasts
it with `multihost_utils.broadcast_one_to_all`: first its length, then the bytes padded to a
power-of-two bucket, so that few shapes ever compile. The other processes run `follow`:
receive, execute, until process 0 broadcasts STOP (length 0) at shutdown.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np

logger = logging.getLogger(__name__)

MIN_BUCKET = 1 << 10  # bytes; smaller payloads are padded up to it
WARM_BUCKETS = 8  # buckets compiled in warm-up: 1 KiB .. 128 KiB (larger ones compile late)
_STOP_LENGTH = 0


def bucket_size(num_bytes: int) -> int:
    """The padded payload length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(num_bytes, 1) - 1).bit_length())


class StepBroadcaster:
    """Process 0's side (`send`, `stop`) and the others' (`receive`) of the step broadcast.

    Every call is a collective over all processes: each `send`/`stop` on process 0 meets one
    `receive` on every other process, in the same order. A process waiting to receive just
    blocks in the collective while process 0 is idle.
    """

    def __init__(self):
        import jax

        self.is_source = jax.process_index() == 0
        self.num_processes = jax.process_count()

    def _broadcast(self, data: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(data, is_source=self.is_source))

    def _exchange(self, payload: bytes | None) -> bytes | None:
        """Length first, then the padded bytes; None stands for STOP (and is what is read)."""
        length = np.array([_STOP_LENGTH if payload is None else len(payload)], np.int64)
        length = int(self._broadcast(length)[0])
        if length == _STOP_LENGTH:
            return None
        buffer = np.zeros(bucket_size(length), np.uint8)
        if self.is_source:
            buffer[:length] = np.frombuffer(payload, np.uint8)
        return self._broadcast(buffer)[:length].tobytes()

    def warm_up(self) -> int:
        """Compiles the broadcasts of the small buckets; every process calls it once, after
        the engine's own warm-up. Returns the number of buckets warmed."""
        for i in range(WARM_BUCKETS):
            size = MIN_BUCKET << i
            self._exchange(bytes(size) if self.is_source else None)
        return WARM_BUCKETS

    def send(self, scheduler_output) -> None:
        """Process 0: hands this step's `SchedulerOutput` to every other process."""
        self._exchange(pickle.dumps(scheduler_output, protocol=pickle.HIGHEST_PROTOCOL))

    def stop(self) -> None:
        """Process 0: tells the others to leave `follow`; the last call it makes."""
        self._exchange(None)

    def receive(self):
        """The others: the next `SchedulerOutput`, or None once process 0 stopped."""
        payload = self._exchange(None)
        return None if payload is None else pickle.loads(payload)


def follow(runner, broadcaster: StepBroadcaster) -> int:
    """A process other than 0: executes every step process 0 broadcasts, in order, until
    STOP. The sampled tokens are the same replicated ones process 0 reads; they are dropped.
    Returns the number of steps run."""
    steps = 0
    while (scheduler_output := broadcaster.receive()) is not None:
        runner.execute(scheduler_output)
        steps += 1
    logger.info("process 0 stopped serving after %d steps", steps)
    return steps
