"""Packed token masks: the packing, llguidance's layout, the step's rows, the device unpack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.core.scheduler_output import SchedulerOutput
from jaxserve.model.sampling.sampler import apply_token_bitmask
from jaxserve.runner.token_bitmask import (bitmask_width, pack_token_bitmask, step_bitmask,
                                           unpack_token_bitmask)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 320, 1000])
def test_packing_round_trips_and_sets_bit_i_of_word_w_for_id_32w_plus_i(vocab):
    allowed = np.random.default_rng(vocab).random((3, vocab)) < 0.3  # [B, V]
    packed = pack_token_bitmask(allowed)
    assert packed.dtype == np.int32 and packed.shape == (3, bitmask_width(vocab))
    np.testing.assert_array_equal(unpack_token_bitmask(packed, vocab), allowed)
    for row, token_id in zip(*np.nonzero(allowed)):
        assert (int(packed[row, token_id // 32]) >> (token_id % 32)) & 1
    assert bitmask_width(vocab) == -(-vocab // 32)


def test_the_layout_is_llguidances():
    llg_numpy = pytest.importorskip("llguidance.numpy")
    vocab = 100
    allowed = np.random.default_rng(1).random((2, vocab)) < 0.5
    logits = np.zeros((2, vocab), np.float32)
    llg_numpy.apply_token_bitmask_inplace(logits, pack_token_bitmask(allowed))
    np.testing.assert_array_equal(np.isfinite(logits), allowed)


def test_the_device_unpack_masks_exactly_the_clear_bits():
    vocab = 77  # not a multiple of 32: the last word's extra bits are ignored
    allowed = np.random.default_rng(2).random((4, vocab)) < 0.4
    allowed[3] = True  # an unconstrained row: all ones
    packed = pack_token_bitmask(allowed)
    packed[3] = -1
    logits = np.random.default_rng(3).normal(size=(4, vocab)).astype(np.float32)
    masked = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(packed)))
    np.testing.assert_array_equal(np.isfinite(masked), allowed)
    np.testing.assert_array_equal(masked[allowed], logits[allowed])


def _output(req_ids, constrained, rows):
    return SchedulerOutput((), (), {r: 1 for r in req_ids}, len(req_ids), frozenset(req_ids),
                           frozenset(), frozenset(), structured_output_req_ids=constrained,
                           grammar_bitmask=rows)


def test_the_steps_mask_puts_each_requests_row_at_its_batch_index():
    vocab = 40  # W = 2; the engine's rows may be wider (the tokenizer's vocabulary)
    rows = np.array([[5, 1, 99], [7, 2, 99]], np.int32)  # [G, W' = 3]
    out = _output(["a", "b", "c"], ("c", "a"), rows)
    mask = step_bitmask(out, ["a", "b", "c"], 8, vocab)  # [B, W]
    assert mask.shape == (8, 2) and mask.dtype == np.int32
    np.testing.assert_array_equal(mask[0], [7, 2])
    np.testing.assert_array_equal(mask[2], [5, 1])
    assert (mask[1] == -1).all() and (mask[3:] == -1).all()
    assert step_bitmask(_output(["a"], (), None), ["a"], 8, vocab) is None
