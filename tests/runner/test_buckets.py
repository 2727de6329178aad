"""Bucket ladders: powers of two, closed by the budget, never past it; pad_to_bucket."""

import pytest

from jaxserve.runner.buckets import (compile_stages, pad_to_bucket, reachable_pairs, seq_buckets,
                                  token_buckets)


def test_token_buckets_are_powers_of_two_from_16_up_to_the_budget():
    assert token_buckets(128) == (16, 32, 64, 128)


def test_a_budget_that_is_not_a_power_of_two_closes_the_ladder():
    assert token_buckets(100) == (16, 32, 64, 100)
    assert seq_buckets(12) == (8, 12)


def test_a_budget_below_the_smallest_rung_is_the_only_bucket():
    assert token_buckets(10) == (10,)
    assert seq_buckets(1) == (1,)


def test_seq_buckets_are_powers_of_two_from_8():
    assert seq_buckets(256) == (8, 16, 32, 64, 128, 256)


@pytest.mark.parametrize("budget", [1, 7, 16, 17, 2048, 3000])
def test_no_bucket_is_past_the_budget(budget):
    assert max(token_buckets(budget)) == budget == max(seq_buckets(budget))


@pytest.mark.parametrize("n, padded", [(0, 16), (1, 16), (16, 16), (17, 32), (65, 100), (100, 100)])
def test_pad_to_bucket_picks_the_smallest_bucket_that_fits(n, padded):
    assert pad_to_bucket(n, token_buckets(100)) == padded


def test_pad_to_bucket_refuses_more_than_the_largest_bucket():
    with pytest.raises(ValueError, match="100"):
        pad_to_bucket(101, token_buckets(100))


def test_a_budget_below_one_is_refused():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        token_buckets(0)


def test_reachable_pairs_need_a_token_per_sequence():
    pairs = reachable_pairs(token_buckets(64), seq_buckets(32))
    assert (16, 16) in pairs and (16, 32) not in pairs  # 17+ sequences need 17+ tokens
    assert (32, 32) in pairs and len(pairs) == 2 + 3 + 3


@pytest.mark.parametrize("tokens, seqs", [(2048, 256), (128, 16), (100, 12), (16, 8),
                                          (4096, 8), (16, 512)])
def test_compile_stages_grow_one_rung_at_a_time_from_the_smallest_to_the_full_ladders(
        tokens, seqs):
    t, s = token_buckets(tokens), seq_buckets(seqs)
    stages = compile_stages(t, s)
    assert stages[0] == (t[0], s[0]) and stages[-1] == (t[-1], s[-1])
    for (t0, b0), (t1, b1) in zip(stages, stages[1:]):
        grew = (t.index(t1) - t.index(t0), s.index(b1) - s.index(b0))
        assert grew in ((1, 0), (0, 1))
    assert len(stages) == len(t) + len(s) - 1


def test_compile_stages_reach_the_early_token_rung_before_more_sequences():
    stages = compile_stages(token_buckets(2048), seq_buckets(256))
    assert stages[:7] == [(16, 8), (32, 8), (64, 8), (128, 8), (256, 8), (512, 8), (512, 16)]
