"""SamplingRows.gather picks the cheapest sampler variant that serves the scheduled rows."""

import numpy as np
import pytest

from jaxserve.runner.sampling_rows import SAMPLER_VARIANTS, SamplingRows, dummy_tensors
from jaxserve.runner.token_bitmask import bitmask_width

VOCAB, MAX_LEN = 100, 32


def _gather(temperatures, *, constrained: bool):
    rows = SamplingRows(4, vocab_size=VOCAB, max_model_len=MAX_LEN)
    rows.temperature[:len(temperatures)] = temperatures
    n = len(temperatures)
    bitmask = (np.full((n, bitmask_width(VOCAB)), -1, np.int32) if constrained else None)
    return rows.gather(np.arange(n), np.ones(n, np.int32), np.zeros((4, MAX_LEN), np.int32),
                       n, bitmask)


def test_greedy_constrained_rows_take_the_mask_and_argmax_variant_not_the_sampler():
    variant, tensors = _gather([0.0, 0.0], constrained=True)
    assert variant == "greedy_masked" and tensors.token_bitmask.shape == (2, 4)
    # the argmax reads the mask only: no other tensor is built or transferred
    assert [f for f, v in vars(tensors).items() if v is not None] == ["token_bitmask"]
    assert _gather([0.0, 0.7], constrained=True)[0] == "masked"
    assert _gather([0.0, 0.0], constrained=False) == ("greedy", None)
    assert _gather([0.0, 0.7], constrained=False)[0] == "sample"


@pytest.mark.parametrize("variant", SAMPLER_VARIANTS)
def test_every_variant_has_warm_up_tensors_of_its_own_shapes(variant):
    tensors = dummy_tensors(variant, 8, vocab_size=VOCAB, max_model_len=MAX_LEN)
    assert (tensors is None) == (variant == "greedy")
    if variant in ("greedy_masked", "masked", "penalties"):
        assert tensors.token_bitmask.shape == (8, bitmask_width(VOCAB))


def test_rows_whose_variant_is_not_compiled_yet_run_as_penalties_with_the_same_tokens():
    import jax

    from jaxserve.model.sampling.sampler import apply_token_bitmask, argmax, sample
    from jaxserve.runner.sampling_rows import EARLY_VARIANTS

    rows = SamplingRows(4, vocab_size=VOCAB, max_model_len=MAX_LEN)
    rows.temperature[:] = [0.0, 0.8, 1.3, 0.0]
    rows.top_p[:] = [1.0, 0.9, 1.0, 1.0]
    rows.top_k[:] = [VOCAB, VOCAB, 7, VOCAB]
    rows.seeds[:] = [1, 2, 3, 4]
    token_ids = np.arange(4 * MAX_LEN, dtype=np.int32).reshape(4, MAX_LEN) % VOCAB
    mask = np.zeros((4, bitmask_width(VOCAB)), np.int32)
    mask[:, :2] = 0x5555_5555  # even ids below 64 only
    logits = jax.random.normal(jax.random.key(0), (4, VOCAB)) * 3  # [B, V]
    for bitmask, temperatures in ((None, [0.0, 0.8, 1.3, 0.0]), (mask, [0.0, 0.8, 1.3, 0.0]),
                                  (None, [0.0] * 4), (mask, [0.0] * 4)):
        rows.temperature[:] = temperatures
        args = (np.arange(4), np.full(4, 5, np.int32), token_ids, 4, bitmask)
        own, own_tensors = rows.gather(*args)
        early, early_tensors = rows.gather(*args, runnable=EARLY_VARIANTS)
        assert early == (own if own in EARLY_VARIANTS else "penalties")
        if early == own:
            continue
        assert early_tensors.token_bitmask.shape == (4, bitmask_width(VOCAB))
        fallback = sample(logits, early_tensors, all_greedy=False, with_logprobs=True)
        if own == "greedy_masked":  # the program's own path: the mask, then argmax
            mine_ids = argmax(apply_token_bitmask(logits, own_tensors.token_bitmask))
        else:
            mine = sample(logits, own_tensors, all_greedy=False, with_logprobs=True)
            mine_ids = mine.token_ids
            np.testing.assert_allclose(fallback.logprobs, mine.logprobs, rtol=1e-6)
        np.testing.assert_array_equal(fallback.token_ids, mine_ids)
        if bitmask is not None:
            assert np.all(np.asarray(fallback.token_ids) % 2 == 0)
