"""Bucket ladders: the few static shapes every step is padded to.

The runner compiles one program per (token bucket, sequence bucket) pair at start-up and
pads each step's T tokens and B sequences up to the next rung. Rungs are powers of two
(tokens from 16, sequences from 8) and the budget itself closes the ladder, so padding never
goes past `max_num_batched_tokens` or `max_num_seqs`. Pure functions; no state.
"""

from __future__ import annotations

import bisect

MIN_TOKEN_BUCKET = 16  # smallest T bucket
MIN_SEQ_BUCKET = 8  # smallest B bucket


def token_buckets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """T buckets: 16, 32, ... up to the budget, then the budget if it is not a rung."""
    return _ladder("max_num_batched_tokens", max_num_batched_tokens, MIN_TOKEN_BUCKET)


def seq_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """B buckets: 8, 16, ... up to the budget, then the budget if it is not a rung."""
    return _ladder("max_num_seqs", max_num_seqs, MIN_SEQ_BUCKET)


def pad_to_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; ValueError if n is negative or exceeds the largest."""
    if n < 0 or n > buckets[-1]:
        raise ValueError(f"pad_to_bucket: n must be in [0, {buckets[-1]}], got {n}")
    return buckets[bisect.bisect_left(buckets, n)]


def _ladder(name: str, budget: int, smallest: int) -> tuple[int, ...]:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {budget!r}")
    rungs = []
    size = smallest
    while size <= budget:
        rungs.append(size)
        size *= 2
    if not rungs or rungs[-1] != budget:
        rungs.append(budget)
    return tuple(rungs)
