"""Step records: the ring buffer, and what a real engine's steps record (token kinds,
padding, KV blocks, prefix hits) checked against what its requests must have cost."""

import dataclasses
import threading

import pytest

from jaxserve import SamplingParams
from jaxserve.engine.step_stats import StepRecord, StepStats


def record(time: float, **fields) -> StepRecord:
    values = {f.name: 0 for f in dataclasses.fields(StepRecord)}
    return StepRecord(**{**values, "time": time, **fields})


def test_the_ring_buffer_keeps_the_newest_records_oldest_first():
    stats = StepStats(maxlen=3)
    for t in range(5):
        stats.append(record(t))
    assert [r.time for r in stats.records()] == [2, 3, 4]
    assert stats.latest().time == 4 and len(stats) == 3


def test_an_empty_ring_buffer_has_no_latest_record():
    assert StepStats().latest() is None and StepStats().records() == ()


def test_the_ring_buffer_needs_room_for_one_record():
    with pytest.raises(ValueError, match="maxlen"):
        StepStats(maxlen=0)


def test_records_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        record(1.0).num_decode_tokens = 3


def test_records_can_be_copied_while_the_engine_thread_appends():
    stats = StepStats(maxlen=1000)
    done = threading.Event()

    def append():
        for t in range(20_000):
            stats.append(record(t))
        done.set()

    thread = threading.Thread(target=append)
    thread.start()
    copies = 0
    while not done.is_set() or copies == 0:
        times = [r.time for r in stats.records()]  # must never raise "mutated during iteration"
        assert times == sorted(times) and len(times) <= 1000
        copies += 1
    thread.join()
    assert stats.latest().time == 19_999


def test_steps_record_their_tokens_padding_blocks_and_prefix_hits(qwen2_llm):
    """Eight requests sharing a 64-token prefix, each generating 6 tokens (no EOS): the
    records must add up to exactly the tokens those requests need."""
    engine = qwen2_llm.llm_engine
    stats_before = engine.get_stats()
    num_before = len(engine.step_stats)
    prefix = list(range(10, 74))
    prompts = [{"prompt_token_ids": prefix + [100 + i, 200 + i]} for i in range(8)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    qwen2_llm.generate(prompts, params, use_tqdm=False)
    records = engine.step_stats.records()[num_before:]
    stats_after = engine.get_stats()

    hits = stats_after["prefix_cache_hits"] - stats_before["prefix_cache_hits"]
    assert hits > 0  # later requests reuse the prefix's blocks
    assert sum(r.num_prefill_tokens for r in records) == 8 * 66 - hits
    assert sum(r.num_decode_tokens for r in records) == 8 * 5  # the 6th token is not fed back
    for r in records:
        assert r.num_padding_tokens == r.token_bucket - r.num_tokens >= 0
        assert r.num_seqs <= r.seq_bucket or r.token_bucket == 0
        assert r.num_used_blocks + r.num_cached_free_blocks + r.num_free_blocks == r.num_blocks
        assert r.host_seconds >= 0 and r.device_wait_seconds >= 0
        assert r.num_compilations == stats_after["num_compilations"]  # none while stepping
    assert max(r.num_used_blocks for r in records) >= 64 // 16  # the shared prefix at least
    last = records[-1]
    assert last.num_used_blocks == 0 and last.num_cached_free_blocks > 0
    assert last.num_running == last.num_waiting == 0
    assert last.prefix_cache_hits == stats_after["prefix_cache_hits"]
    assert [r.time for r in records] == sorted(r.time for r in records)
