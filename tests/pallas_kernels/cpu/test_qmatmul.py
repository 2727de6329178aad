"""The native quantized GEMM against x @ dequantize(W) in float64: int8 per channel and in
groups, int4 in groups of 32 and 128 with and without mins, float32 or float16 scales; row
and column tails (N off the 16-column panel), `rows`, batch dims, and every build target
this CPU executes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.model.quantization import QuantizedWeight, quantize
from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import qmatmul

pytestmark = needs_compiler

# (kind, group size, form): the forms the loader makes, GGUF's included: int8 per channel,
# Q8_0 (int8 g32), Q6_K (int8 g16), Q5_K (int8 g32 with a min, q 0..31), int4 g32 / g128
# and Q4_1 / Q4_K (with a min), Q4_0 (int4 g32, (q - 8) * scale)
KINDS = [("int8", None, "as made"), ("int8", 32, "as made"), ("int8", 16, "as made"),
         ("int8", 32, "with min"), ("int4", 32, "as made"), ("int4", 128, "as made"),
         ("int4", 32, "symmetric")]
SHAPES = [(1, 256, 48), (5, 128, 37), (17, 256, 16), (3, 128, 7)]


def make_weight(k, n, kind, group, form, seed=0, scale_dtype=np.float32) -> QuantizedWeight:
    """A random weight of one of the forms (KINDS); float16 `scale_dtype`: its scales (and
    mins) rounded to float16, as GGUF's Q8_0 / Q4_0 / Q4_1 keep them."""
    rng = np.random.default_rng(seed)
    qw = quantize(rng.standard_normal((k, n)).astype(np.float32), kind, group_size=group)
    if form == "symmetric":  # GGUF's Q4_0: (q - 8) * scale, no min
        qw = QuantizedWeight(qw.packed, qw.scales, None, 4, qw.group_size, "float32")
    elif form == "with min":  # GGUF's Q5_K: q * scale + min, q in 0..31
        q = rng.integers(0, 32, (k, n)).astype(np.int8)
        mins = -rng.uniform(0, 0.5, qw.scales.shape).astype(np.float32)
        qw = QuantizedWeight(q, qw.scales, mins, 8, qw.group_size, "float32")
    return qw.map(lambda a: a.astype(scale_dtype) if a.dtype == np.float32 else a)


def operands(qw: QuantizedWeight) -> tuple:
    """(packed, scales, mins or None) as device arrays: the qmatmul ops' weight operands."""
    return (jnp.asarray(qw.packed), jnp.asarray(qw.scales),
            None if qw.mins is None else jnp.asarray(qw.mins))


def check(y, x, qw: QuantizedWeight):
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w64 = np.asarray(qw.dequantize(), np.float64)
    ref, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
    got = np.asarray(y, np.float64).reshape(ref.shape)
    err = np.abs(got - ref)
    # float32 sums, and the group's sum of x times its min
    assert np.all(err <= 1e-5 * scale + 1e-6), f"max error {err.max()}"


@pytest.mark.parametrize("kind,group,form", KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_the_dequantized_product(m, k, n, kind, group, form, march):
    qw = make_weight(k, n, kind, group, form)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, k)), jnp.float32)
    y = qmatmul.qmatmul(x, jnp.asarray(qw.packed), jnp.asarray(qw.scales),
                        None if qw.mins is None else jnp.asarray(qw.mins), bits=qw.bits,
                        group_size=qw.group_size, march=march)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    check(y, x, qw)


def run(x, qw: QuantizedWeight, march: str):
    return qmatmul.qmatmul(x, jnp.asarray(qw.packed), jnp.asarray(qw.scales),
                           None if qw.mins is None else jnp.asarray(qw.mins), bits=qw.bits,
                           group_size=qw.group_size, march=march)


# GGUF's forms with their float16 scales and mins: Q8_0, Q4_1, Q4_0
@pytest.mark.parametrize("kind,group,form", [("int8", 32, "as made"), ("int4", 32, "as made"),
                                             ("int4", 32, "symmetric")])
@pytest.mark.parametrize("m,k,n", SHAPES + [(1, 512, 600)])  # the last: split over threads
def test_float16_scales_match_the_dequantized_product(m, k, n, kind, group, form, march):
    qw = make_weight(k, n, kind, group, form, scale_dtype=np.float16)
    assert qw.scales.dtype == np.float16
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, k)), jnp.float32)
    check(run(x, qw, march), x, qw)


# groups of 6 rows: the one-row path's two-rows-a-pass loop (4 rows need a group of 4 n)
@pytest.mark.parametrize("kind,form", [("int8", "as made"), ("int4", "as made"),
                                       ("int8", "with min")])
def test_groups_of_an_odd_number_of_row_pairs(kind, form, march):
    qw = make_weight(96, 100, kind, 6, form)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 96)), jnp.float32)
    check(run(x, qw, march), x, qw)


def test_rows_past_the_count_are_zero_under_jit():
    qw = make_weight(128, 40, "int4", 32, "as made")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 128)), jnp.float32)
    arrays = [jnp.asarray(a) for a in (qw.packed, qw.scales, qw.mins)]
    fn = jax.jit(lambda x, r: qmatmul.qmatmul(x, *arrays, bits=4, group_size=32, rows=r))
    y = np.asarray(fn(x, jnp.int32(3)))  # [2, 4, 40]
    assert y.shape == (2, 4, 40)
    check(y.reshape(8, 40)[:3], x.reshape(8, 128)[:3], qw)
    assert not y.reshape(8, 40)[3:].any()


def test_mismatched_operands_are_rejected():
    qw = make_weight(64, 16, "int8", None, "as made")
    x = jnp.zeros((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="x must be float32"):
        qmatmul.qmatmul(x.astype(jnp.bfloat16), qw.packed, qw.scales, bits=8, group_size=64)
    with pytest.raises(ValueError, match="does not match K"):
        qmatmul.qmatmul(x, qw.packed[:16].view(np.uint8), qw.scales, bits=4, group_size=64)
    with pytest.raises(ValueError, match="scales must be"):
        qmatmul.qmatmul(x, qw.packed, qw.scales[:, :8], bits=8, group_size=64)
    with pytest.raises(ValueError, match="scales must be float32 or float16"):
        qmatmul.qmatmul(x, qw.packed, qw.scales.astype(np.float64), bits=8, group_size=64)
    q4 = make_weight(64, 16, "int4", 32, "as made")
    with pytest.raises(ValueError, match="mins must be float16"):
        qmatmul.qmatmul(x, q4.packed, q4.scales.astype(np.float16), q4.mins, bits=4,
                        group_size=32)
