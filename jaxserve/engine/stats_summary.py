"""Step records -> one summary per window: what the dashboard sends once a second and what
benchmarks/dashboard_charts.py draws from a finished run.

`summarize(records, start, end)` turns the records of one window into plain numbers (JSON
ready): tokens per second by kind, the batch mix of its last steps, prefix-cache hits,
requests, KV blocks and step times. Running totals are differenced against the last record
before the window, so a window with no step reports zero work and the latest state.
`per_second(records, end, seconds)` summarizes each second of a stretch, oldest first.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

from jaxserve.engine.step_stats import StepRecord

# Steps of a window whose batch mix is sent (the most recent ones).
MAX_BATCH_STEPS = 32
_time = operator.attrgetter("time")


def summarize(records: Sequence[StepRecord], start: float, end: float) -> dict:
    """The window (start, end] of `records` (oldest first, as StepStats keeps them)."""
    lo = bisect.bisect_right(records, start, key=_time)
    hi = bisect.bisect_right(records, end, lo=lo, key=_time)
    window = records[lo:hi]
    before = records[lo - 1] if lo > 0 else None
    last = records[hi - 1] if hi > 0 else None
    seconds = max(end - start, 1e-9)
    prefill = sum(r.num_prefill_tokens for r in window)
    decode = sum(r.num_decode_tokens for r in window)
    queries = _delta(last, before, "prefix_cache_queries")
    hits = _delta(last, before, "prefix_cache_hits")
    return {
        "time": end,
        "seconds": end - start,
        "num_steps": len(window),
        "tokens": {"prefill": prefill, "decode": decode,
                   "padding": sum(r.num_padding_tokens for r in window)},
        "tokens_per_s": {"prompt": prefill / seconds, "generated": decode / seconds},
        "batch": [[r.num_prefill_tokens, r.num_decode_tokens, r.num_padding_tokens]
                  for r in window[-MAX_BATCH_STEPS:]],
        "prefix_cache": {"queries": queries, "hits": hits,
                         "hit_rate": hits / queries if queries else None,
                         "total_queries": last.prefix_cache_queries if last else 0,
                         "total_hits": last.prefix_cache_hits if last else 0},
        "requests": {"running": last.num_running if last else 0,
                     "waiting": last.num_waiting if last else 0,
                     "preempted": _delta(last, before, "num_preemptions"),
                     "total_preempted": last.num_preemptions if last else 0},
        "kv": kv_blocks(last),
        "compilations": last.num_compilations if last else 0,
        "step_ms": {"host": _mean_ms(r.host_seconds for r in window),
                    "device_wait": _mean_ms(r.device_wait_seconds for r in window)},
    }


def per_second(records: Sequence[StepRecord], end: float, seconds: int) -> list[dict]:
    """One summary for each of the `seconds` one-second windows before `end`, oldest first."""
    return [summarize(records, end - k - 1, end - k) for k in reversed(range(seconds))]


def kv_blocks(record: StepRecord | None) -> dict:
    """The KV pool after `record`'s step: blocks used / cached and free / free."""
    if record is None:
        return {"num_blocks": 0, "used": 0, "cached": 0, "free": 0}
    return {"num_blocks": record.num_blocks, "used": record.num_used_blocks,
            "cached": record.num_cached_free_blocks, "free": record.num_free_blocks}


def _delta(last: StepRecord | None, before: StepRecord | None, name: str) -> int:
    if last is None:
        return 0
    return getattr(last, name) - (getattr(before, name) if before is not None else 0)


def _mean_ms(values) -> float | None:
    values = list(values)
    return 1000 * sum(values) / len(values) if values else None
