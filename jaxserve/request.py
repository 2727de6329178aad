"""Request: one prompt's life in the engine, and its ordered status.

The engine creates a `Request` from token ids and `SamplingParams`; the scheduler owns it
from then on: it appends sampled tokens, advances `num_computed_tokens` (the tokens whose
KV is in the cache), keeps the block hashes of its full blocks up to date and sets the
final status. `RequestStatus` sorts the finished statuses after the live ones and maps
each to the OpenAI finish reason ("stop", "length", "abort").
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.core.block_hash import BlockHash
    from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Live statuses first, finished ones after: `status > PREEMPTED` means finished."""

    WAITING = 0  # queued, holds no blocks
    RUNNING = 1  # holds blocks; scheduled whenever the budgets allow
    PREEMPTED = 2  # blocks freed for recompute; back at the head of the waiting queue
    FINISHED_STOPPED = 3  # EOS, a stop token id or (via the engine) a stop string
    FINISHED_LENGTH_CAPPED = 4  # max_tokens or the model's context length reached
    FINISHED_ABORTED = 5  # cancelled by the client or the engine

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    def get_finished_reason(self) -> str | None:
        """The OpenAI `finish_reason`, or None while the request is live."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A prompt, its outputs so far and the scheduler's bookkeeping for it."""

    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "eos_token_ids",
                 "arrival_time", "priority", "cache_salt", "output_token_ids", "_all_token_ids",
                 "num_computed_tokens", "num_sent_tokens", "num_output_placeholders",
                 "status", "stop_reason",
                 "num_preemptions", "num_cached_tokens", "block_hashes")

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int],
                 sampling_params: SamplingParams, eos_token_id: int | Iterable[int] | None = None,
                 arrival_time: float | None = None, priority: int = 0,
                 cache_salt: str | None = None) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError(f"Request.prompt_token_ids must be non-empty (request {request_id!r})")
        self.request_id = request_id  # unique among live requests
        self.prompt_token_ids = tuple(prompt_token_ids)  # [P] the prompt, never changes
        self.sampling_params = sampling_params  # shared, frozen
        # Ending on any of these is FINISHED_STOPPED (unless ignore_eos); several for Llama 3.
        self.eos_token_ids: frozenset[int] = _as_id_set(eos_token_id)
        self.arrival_time = time.time() if arrival_time is None else arrival_time  # seconds
        self.priority = priority  # lower is served first under the "priority" policy
        self.cache_salt = cache_salt  # isolates this request's prefix-cache entries
        self.output_token_ids: list[int] = []  # sampled tokens accepted so far
        self._all_token_ids: list[int] = list(prompt_token_ids)  # prompt + outputs
        self.num_computed_tokens = 0  # leading tokens whose KV is (being) computed
        self.num_sent_tokens = 0  # leading tokens the runner has (sent, or sampled by it)
        # Tokens being sampled by steps whose output is not back yet (one per step; see
        # Scheduler.schedule(ahead=True)); they count as known for scheduling.
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or string that ended it
        self.num_preemptions = 0  # times its blocks were taken back for recompute
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.block_hashes: list[BlockHash] = []  # one per full block of all_token_ids

    @property
    def eos_token_id(self) -> int | None:
        """The smallest EOS id (the usual single one), or None."""
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus outputs: the count `num_computed_tokens` catches up with."""
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs. Read-only view: append through `append_output_token_ids`."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def append_output_token_ids(self, token_ids: int | Iterable[int]) -> None:
        if isinstance(token_ids, int):
            self.output_token_ids.append(token_ids)
            self._all_token_ids.append(token_ids)
        else:
            token_ids = list(token_ids)
            self.output_token_ids.extend(token_ids)
            self._all_token_ids.extend(token_ids)

    def get_finished_reason(self) -> str | None:
        return self.status.get_finished_reason()

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})")


def _as_id_set(ids: int | Iterable[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    return frozenset((ids,)) if isinstance(ids, int) else frozenset(ids)
