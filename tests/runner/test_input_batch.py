"""InputBatch: scheduler deltas in, padded step arrays out, padding pointed at block 0."""

import numpy as np
import pytest

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


def test_the_batch_keeps_its_samples_and_links_tokens_still_being_sampled():
    batch = _batch()
    params = SamplingParams()
    first = batch.prepare(_output(new=[NewRequestData("a", (1, 2, 3, 4), params, (6,), 0),
                                       NewRequestData("b", (9, 8), params, (5,), 0)],
                                  scheduled={"a": 4, "b": 2}))
    # async scheduling: the next step decodes the tokens `first` is still sampling
    ahead = _output(cached=[CachedRequestData("b", (), (), 2, False),
                            CachedRequestData("a", (), (), 4, False)],
                    scheduled={"b": 1, "a": 1})
    step = batch.prepare(ahead, {"a": 0, "b": 1})  # index of each in `first`
    np.testing.assert_array_equal(step.input_ids[:2], [-2, -1])  # b is sample 1, a sample 0
    np.testing.assert_array_equal(step.positions[:2], [2, 4])
    batch.append_sampled(first, frozenset({"a", "b"}), np.array([40, 41]))
    assert batch.token_ids[batch.row_of["a"], :5].tolist() == [1, 2, 3, 4, 40]
    assert batch.num_tokens[batch.row_of["b"]] == 3
    batch.append_sampled(step, frozenset({"a", "b"}), np.array([51, 50]))
    assert batch.token_ids[batch.row_of["a"], 4:6].tolist() == [40, 50]


def test_an_unknown_token_without_a_step_sampling_it_is_an_error():
    batch = _batch()
    params = SamplingParams()
    batch.prepare(_output(new=[NewRequestData("a", (1, 2, 3, 4), params, (6,), 0)],
                          scheduled={"a": 4}))
    ahead = _output(cached=[CachedRequestData("a", (), (), 4, False)], scheduled={"a": 1})
    with pytest.raises(RuntimeError, match="neither known nor being sampled"):
        batch.prepare(ahead, {"other": 0})


def test_samples_for_a_released_or_replaced_row_are_dropped():
    batch = _batch()
    params = SamplingParams()
    first = batch.prepare(_output(new=[NewRequestData("a", (1, 2, 3), params, (6,), 0)],
                                  scheduled={"a": 3}))
    # "a" finished meanwhile and a new request reused its id (and its row)
    batch.prepare(_output(new=[NewRequestData("a", (7, 7), params, (5,), 0)],
                          scheduled={"a": 2}, finished=["a"]))
    row = batch.row_of["a"]
    batch.append_sampled(first, frozenset({"a"}), np.array([99]))
    assert batch.num_tokens[row] == 2 and 99 not in batch.token_ids[row].tolist()


def test_a_request_keeps_its_sampling_setup_and_drawn_seed_through_preemption():
    batch = _batch()
    params = SamplingParams(temperature=0.5, min_tokens=2)
    batch.prepare(_output(new=[NewRequestData("a", (1, 2, 3), params, (6,), 0, (7,))],
                          scheduled={"a": 3}))
    row = batch.row_of["a"]
    seed, banned = batch.sampling.seeds[row], batch.sampling.banned_ids[row, 0]
    assert batch.params_of("a") is params and banned == 7
    batch.prepare(_output(preempted=["a"]))
    batch.prepare(_output(new=[NewRequestData("b", (4, 5), SamplingParams(), (8,), 0)],
                          scheduled={"b": 2}))  # b takes a's old row
    assert batch.knows("a") and batch.row_of["b"] == row
    batch.prepare(_output(cached=[CachedRequestData("a", (1, 2, 3), (2,), 0, True)],
                          scheduled={"a": 3}))
    row = batch.row_of["a"]
    assert batch.sampling.seeds[row] == seed and batch.sampling.banned_ids[row, 0] == 7
    assert batch.sampling.prompt_lens[row] == 3 and batch.sampling.temperature[row] == 0.5
    batch.prepare(_output(finished=["a"]))
    assert not batch.knows("a")
