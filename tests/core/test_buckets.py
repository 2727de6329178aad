"""Bucket ladders: powers of two, closed by the budget, never past it; pad_to_bucket."""

import pytest

from jaxserve.core.buckets import pad_to_bucket, seq_buckets, token_buckets


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
