"""The quantized gated MLP in one call, silu(x @ W_gate) * (x @ W_up), against the same
function of the dequantized products in float64: every form, float32 and float16 scales,
one row (GEMV chunks, split over the threads, a column tail) and several (the panels),
`rows`, and every build target this CPU executes."""

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import qmatmul

from .test_qmatmul import KINDS, make_weight, operands

pytestmark = needs_compiler


def silu_mul_reference(x, gate, up):  # float64 [M, N]
    x64 = np.asarray(x, np.float64)
    g = x64 @ np.asarray(gate.dequantize(), np.float64)
    u = x64 @ np.asarray(up.dequantize(), np.float64)
    return g / (1 + np.exp(-g)) * u, (np.abs(x64) @ np.abs(np.asarray(gate.dequantize()))
                                      + 1) * (np.abs(x64) @ np.abs(np.asarray(up.dequantize())))


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kind,group,form", KINDS)
@pytest.mark.parametrize("m,k,n,rows", [(1, 256, 1100, 1), (4, 128, 600, 1), (5, 128, 37, 3)])
def test_matches_silu_of_the_dequantized_products(m, k, n, rows, kind, group, form,
                                                  scale_dtype, march):
    gate = make_weight(k, n, kind, group, form, seed=1, scale_dtype=scale_dtype)
    up = make_weight(k, n, kind, group, form, seed=2, scale_dtype=scale_dtype)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((m, k)) / np.sqrt(k),
                    jnp.float32)
    y = np.asarray(qmatmul.qmatmul_gated(x, operands(gate), operands(up), bits=gate.bits,
                                         group_size=gate.group_size, rows=rows, march=march))
    assert y.shape == (m, n) and y.dtype == np.float32
    ref, scale = silu_mul_reference(x[:rows], gate, up)
    assert np.all(np.abs(y[:rows] - ref) <= 1e-5 * scale + 1e-6)
    assert not y[rows:].any()


def test_weights_of_two_forms_are_refused():
    gate = make_weight(64, 32, "int4", 32, "as made")
    up = make_weight(64, 32, "int4", 32, "as made", scale_dtype=np.float16)
    with pytest.raises(ValueError, match="one form"):
        qmatmul.qmatmul_gated(jnp.zeros((1, 64), jnp.float32), operands(gate), operands(up),
                              bits=4, group_size=32)
