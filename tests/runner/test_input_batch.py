"""InputBatch: scheduler deltas in, padded step arrays out, padding pointed at block 0."""

import numpy as np

from jaxserve.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from jaxserve.runner.input_batch import InputBatch
from jaxserve.sampling_params import SamplingParams


def _batch():
    return InputBatch(max_num_seqs=4, max_model_len=64, block_size=4, vocab_size=100,
                      token_buckets=(16, 32), seq_buckets=(8,))


def _output(new=(), cached=(), scheduled=None, finished=(), preempted=()):
    scheduled = scheduled or {}
    return SchedulerOutput(tuple(new), tuple(cached), dict(scheduled), sum(scheduled.values()),
                           frozenset(scheduled), frozenset(finished), frozenset(preempted))


def test_first_step_lays_out_a_prefix_hit_and_a_fresh_prompt():
    batch = _batch()
    params = SamplingParams()
    out = _output(new=[NewRequestData("a", tuple(range(10, 20)), params, (7, 3, 9), 8),
                       NewRequestData("b", (50, 51, 52), params, (5,), 0)],
                  scheduled={"a": 2, "b": 3})
    step = batch.prepare(out)
    np.testing.assert_array_equal(step.input_ids[:5], [18, 19, 50, 51, 52])
    np.testing.assert_array_equal(step.positions[:5], [8, 9, 0, 1, 2])
    # a: positions 8, 9 live in its third block (9); b: block 5.
    np.testing.assert_array_equal(step.slot_mapping[:5], [36, 37, 20, 21, 22])
    np.testing.assert_array_equal(step.slot_mapping[5:], np.arange(5, 16) % 4)  # null block 0
    np.testing.assert_array_equal(step.query_start_loc, [0, 2, 5, 5, 5, 5, 5, 5, 5])
    np.testing.assert_array_equal(step.seq_lens, [10, 3, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(step.logits_indices[:2], [1, 4])
    assert step.block_tables.shape == (8, 16) and step.block_tables[0, :4].tolist() == [7, 3, 9, 0]
    assert len(step.input_ids) == 16 and step.num_tokens == 5


def test_deltas_extend_rows_and_preempted_requests_come_back_whole():
    batch = _batch()
    params = SamplingParams()
    batch.prepare(_output(new=[NewRequestData("a", (1, 2, 3, 4), params, (6,), 0)],
                          scheduled={"a": 4}))
    step = batch.prepare(_output(cached=[CachedRequestData("a", (77,), (8,), 4, False)],
                                 scheduled={"a": 1}))
    assert step.input_ids[0] == 77 and step.slot_mapping[0] == 8 * 4
    batch.prepare(_output(preempted=["a"]))
    assert "a" not in batch.row_of
    step = batch.prepare(_output(
        cached=[CachedRequestData("a", (1, 2, 3, 4, 77, 78), (2, 3), 0, True)],
        scheduled={"a": 6}))
    np.testing.assert_array_equal(step.input_ids[:6], [1, 2, 3, 4, 77, 78])
    np.testing.assert_array_equal(step.slot_mapping[:6], [8, 9, 10, 11, 12, 13])
