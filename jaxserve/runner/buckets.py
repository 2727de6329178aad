"""Bucket ladders: the few static shapes every step is padded to, and the order in which
their programs are compiled.

The runner compiles one program per reachable (token bucket, sequence bucket) pair and pads
each step's T tokens and B sequences up to the next rung. Rungs are powers of two (tokens
from 16, sequences from 8) and the budget itself closes the ladder, so padding never goes
past `max_num_batched_tokens` or `max_num_seqs`. `compile_stages` orders the compilation as
a growing rectangle of (largest T, largest B): while only part of it is compiled, the
scheduler keeps its steps inside (`Scheduler.schedule`'s caps). Pure functions; no state.
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


def reachable_pairs(tokens: tuple[int, ...], seqs: tuple[int, ...]) -> list[tuple[int, int]]:
    """(T bucket, B bucket) pairs some step can pad to: a step has at least one token per
    sequence, so B's lowest count (one more than the rung below) must be <= T."""
    lowest = {b: (seqs[i - 1] + 1 if i else 1) for i, b in enumerate(seqs)}
    return [(t, b) for t in tokens for b in seqs if lowest[b] <= t]


# The token rung the compilation reaches before it grows the sequence buckets: one user's
# prompt prefills in a few steps before many users fill a batch.
EARLY_TOKEN_BUCKET = 512


def compile_stages(tokens: tuple[int, ...], seqs: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (T cap, B cap) rectangles the compilation completes one after another: the
    smallest buckets first, then T up to EARLY_TOKEN_BUCKET, then B and T in turn until
    both ladders are done. Every stage adds one rung to one of them; the last is
    (tokens[-1], seqs[-1])."""
    i = j = 0
    stages = [(tokens[0], seqs[0])]
    while i + 1 < len(tokens) and tokens[i + 1] <= EARLY_TOKEN_BUCKET:
        i += 1
        stages.append((tokens[i], seqs[j]))
    grow_seqs = True
    while i + 1 < len(tokens) or j + 1 < len(seqs):
        if (grow_seqs and j + 1 < len(seqs)) or i + 1 == len(tokens):
            j += 1
        else:
            i += 1
        grow_seqs = not grow_seqs
        stages.append((tokens[i], seqs[j]))
    return stages


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
