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
