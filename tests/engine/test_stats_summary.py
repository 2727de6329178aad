"""Summaries of step records: window bounds, rates, running totals differenced, the state
after the last step when a window has none."""

import dataclasses

from jaxserve.engine.stats_summary import MAX_BATCH_STEPS, per_second, summarize
from jaxserve.engine.step_stats import StepRecord


def record(time: float, **fields) -> StepRecord:
    values = {f.name: 0 for f in dataclasses.fields(StepRecord)}
    return StepRecord(**{**values, "time": time, "num_blocks": 10, **fields})


RECORDS = (
    record(0.5, num_prefill_tokens=60, num_padding_tokens=4, prefix_cache_queries=100,
           prefix_cache_hits=32, num_used_blocks=4, num_free_blocks=6, num_running=2,
           host_seconds=0.002, device_wait_seconds=0.010),
    record(1.2, num_prefill_tokens=30, num_decode_tokens=2, num_padding_tokens=0,
           prefix_cache_queries=150, prefix_cache_hits=64, num_preemptions=1,
           num_used_blocks=6, num_cached_free_blocks=1, num_free_blocks=3, num_running=3,
           num_waiting=1, host_seconds=0.004, device_wait_seconds=0.020),
    record(1.7, num_decode_tokens=3, num_padding_tokens=13, prefix_cache_queries=150,
           prefix_cache_hits=64, num_preemptions=1, num_used_blocks=0,
           num_cached_free_blocks=5, num_free_blocks=5, num_compilations=7),
)


def test_a_window_counts_its_own_steps_and_the_differences_of_running_totals():
    s = summarize(RECORDS, 1.0, 2.0)  # the second and third records
    assert s["num_steps"] == 2
    assert s["tokens"] == {"prefill": 30, "decode": 5, "padding": 13}
    assert s["tokens_per_s"] == {"prompt": 30.0, "generated": 5.0}
    assert s["batch"] == [[30, 2, 0], [0, 3, 13]]
    prefix = s["prefix_cache"]
    assert (prefix["queries"], prefix["hits"]) == (50, 32) and prefix["hit_rate"] == 0.64
    assert (prefix["total_queries"], prefix["total_hits"]) == (150, 64)
    assert s["requests"] == {"running": 0, "waiting": 0, "preempted": 1, "total_preempted": 1}
    assert s["kv"] == {"num_blocks": 10, "used": 0, "cached": 5, "free": 5}
    assert s["compilations"] == 7
    assert s["step_ms"]["host"] == 2.0 and s["step_ms"]["device_wait"] == 10.0


def test_a_window_without_steps_reports_no_work_and_the_state_after_the_last_step():
    s = summarize(RECORDS, 5.0, 6.0)
    assert s["num_steps"] == 0 and s["tokens_per_s"] == {"prompt": 0.0, "generated": 0.0}
    assert s["prefix_cache"]["hit_rate"] is None and s["prefix_cache"]["total_hits"] == 64
    assert s["kv"]["cached"] == 5 and s["step_ms"] == {"host": None, "device_wait": None}


def test_a_window_before_any_step_is_empty():
    s = summarize(RECORDS, -2.0, 0.0)
    assert s["num_steps"] == 0 and s["kv"]["num_blocks"] == 0 and s["compilations"] == 0


def test_the_rate_divides_by_the_window_length():
    s = summarize(RECORDS, 0.0, 0.5)  # the bound is inclusive at the end
    assert s["num_steps"] == 1 and s["tokens_per_s"]["prompt"] == 120.0


def test_only_the_last_steps_batch_mix_is_sent():
    many = [record(1 + i / 1000, num_decode_tokens=i) for i in range(100)]
    batch = summarize(many, 0.0, 2.0)["batch"]
    assert len(batch) == MAX_BATCH_STEPS and batch[-1] == [0, 99, 0]


def test_per_second_summarizes_each_second_oldest_first():
    seconds = per_second(RECORDS, 2.0, 3)
    assert [s["time"] for s in seconds] == [0.0, 1.0, 2.0]
    assert [s["num_steps"] for s in seconds] == [0, 1, 2]
    assert sum(s["tokens"]["prefill"] for s in seconds) == 90
