"""What each engine step did, kept for the last few minutes: the dashboard's raw data.

`LLMEngine.step()` appends one frozen `StepRecord` per collected step to its `StepStats`, a
ring buffer (a `deque` with a maximum length: the append is the only work on the step
path, and it needs no lock). Readers on other threads take `records()`, a tuple copy that
CPython makes without letting the engine thread append in between. Counters that only grow
(prefix-cache tokens, preemptions, compilations) are stored as running totals, so a window
of records gives its own numbers by difference and a dropped record loses nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

from jaxserve.core.scheduler_output import SchedulerOutput
from jaxserve.request import Request

# Steps kept: minutes of history at tens of steps per second, about 200 bytes each.
STEP_HISTORY = 16384


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    """One collected step, and the engine's state right after it was applied."""

    time: float  # time.time() when the step's results were applied (the charts' x axis)
    num_prefill_tokens: int  # tokens of prompts (and of recomputed preempted requests)
    num_decode_tokens: int  # tokens sampled by the step before, fed back one per request
    num_padding_tokens: int  # token_bucket - real tokens: compute spent on padding
    num_seqs: int  # B, requests in the step
    token_bucket: int  # T padded: the compiled program's token bucket (0: nothing ran)
    seq_bucket: int  # B padded: its sequence bucket (0: nothing ran)
    num_blocks: int  # KV blocks requests can hold (the null block left out)
    num_used_blocks: int  # held by at least one request
    num_cached_free_blocks: int  # held by none, a cached prefix kept for reuse
    num_free_blocks: int  # held by none and holding nothing (cached ones not counted)
    num_running: int  # requests running after the step
    num_waiting: int  # requests waiting (preempted ones included) after the step
    prefix_cache_queries: int  # running total: tokens looked up in the prefix cache
    prefix_cache_hits: int  # running total: of those, tokens found
    num_preemptions: int  # running total
    num_compilations: int  # running total of this engine's XLA compilations
    host_seconds: float  # the step's wall time not spent waiting for the devices
    device_wait_seconds: float  # time blocked on the step's device-to-host copy

    @property
    def num_tokens(self) -> int:
        """Real tokens computed (prefill + decode)."""
        return self.num_prefill_tokens + self.num_decode_tokens


class StepStats:
    """The ring buffer of the last `maxlen` steps' records."""

    def __init__(self, maxlen: int = STEP_HISTORY):
        if maxlen < 1:
            raise ValueError(f"StepStats maxlen must be >= 1, got {maxlen}")
        self._records: collections.deque[StepRecord] = collections.deque(maxlen=maxlen)

    def append(self, record: StepRecord) -> None:
        """Engine thread only; the oldest record drops out once the buffer is full."""
        self._records.append(record)

    def records(self) -> tuple[StepRecord, ...]:
        """Oldest first; a copy, safe to read from any thread."""
        return tuple(self._records)

    def latest(self) -> StepRecord | None:
        try:
            return self._records[-1]
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._records)


def count_token_kinds(out: SchedulerOutput,
                      requests: Mapping[str, Request]) -> tuple[int, int]:
    """(prefill, decode) tokens of a planned step. A decode is one token scheduled for a
    request past its prompt; everything else (prompt chunks, a preempted request's
    recomputation) is prefill. `requests`: the scheduler's live ones, read at planning."""
    decode = 0
    for req in out.scheduled_cached_reqs:
        if req.resumed_from_preemption or out.num_scheduled_tokens.get(req.req_id) != 1:
            continue
        request = requests.get(req.req_id)
        if request is not None and req.num_computed_tokens >= request.num_prompt_tokens:
            decode += 1
    return out.total_num_scheduled_tokens - decode, decode
