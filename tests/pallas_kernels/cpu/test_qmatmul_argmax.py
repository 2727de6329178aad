"""The quantized GEMM's one-row path (several column chunks and a tail) and its fused
argmax (a greedy LM head over a quantized [D, V] head) against the dequantized product, on
every build target this CPU executes (the portable loops and the SIMD kernels)."""

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import qmatmul

from .test_qmatmul import check, make_weight, operands

pytestmark = needs_compiler

FORMS = [("int8", 32, "as made"), ("int8", 16, "as made"), ("int8", 32, "with min"),
         ("int4", 32, "as made"), ("int4", 32, "symmetric")]


# K = 64: one thread's chunks (1024 columns, then 76); K = 256: split between threads
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("kind,group,form", FORMS)
def test_one_row_over_several_chunks_matches_the_dequantized_product(kind, group, form, k,
                                                                      scale_dtype, march):
    # N % 32 = 12: a tail
    qw = make_weight(k, 1100, kind, group, form, seed=3, scale_dtype=scale_dtype)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, k)), jnp.float32)
    y = qmatmul.qmatmul(x, *operands(qw), bits=qw.bits, group_size=qw.group_size, rows=1,
                        march=march)
    check(y[:1], x[:1], qw)
    assert not np.asarray(y[1:]).any()


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kind,group,form", FORMS)
@pytest.mark.parametrize("rows", [1, 3])
def test_argmax_is_the_argmax_of_the_product(kind, group, form, rows, scale_dtype, march):
    qw = make_weight(64, 1100, kind, group, form, seed=5, scale_dtype=scale_dtype)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 64)), jnp.float32)
    args = dict(bits=qw.bits, group_size=qw.group_size, rows=rows, march=march)
    idx = np.asarray(qmatmul.qmatmul_argmax(x, *operands(qw), **args))
    logits = np.asarray(qmatmul.qmatmul(x, *operands(qw), **args))
    assert idx.dtype == np.int32 and idx.shape == (4,)
    np.testing.assert_array_equal(idx[:rows], logits[:rows].argmax(axis=-1))
    assert not idx[rows:].any()
    # and the dequantized float product picks the same tokens (no near-ties here)
    ref = np.asarray(x, np.float64)[:rows] @ np.asarray(qw.dequantize(), np.float64)
    np.testing.assert_array_equal(idx[:rows], ref.argmax(axis=-1))


def test_argmax_takes_the_first_of_ties_and_the_first_nan(march):
    qw = make_weight(32, 96, "int8", 32, "as made")
    packed = np.zeros_like(qw.packed)
    packed[0, [7, 40, 90]] = 5  # three equal largest logits
    scales = np.ones_like(qw.scales)
    x = np.zeros((2, 32), np.float32)
    x[:, 0] = 1.0
    x[1, 1] = np.nan  # every logit of row 1 is NaN: the first
    idx = qmatmul.qmatmul_argmax(jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scales),
                                 bits=8, group_size=32, march=march)
    np.testing.assert_array_equal(np.asarray(idx), [7, 0])
