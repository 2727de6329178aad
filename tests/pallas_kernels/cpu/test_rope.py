"""The native rotary kernel equals the rotate-half formula in float32, for both dtypes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import rope

pytestmark = needs_compiler


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 64), (1, 1, 2), (17, 8, 128)])
def test_rope_matches_the_rotate_half_formula(dtype, shape, march):
    rng = np.random.default_rng(0)
    tokens, _, head_dim = shape
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    angles = rng.uniform(0, 100, (tokens, head_dim // 2)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    got = jax.jit(rope.rope, static_argnames="march")(x, jnp.asarray(cos), jnp.asarray(sin),
                                                      march=march)
    xf = np.asarray(x, np.float32)
    x1, x2 = np.split(xf, 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    assert got.dtype == dtype and got.shape == shape
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)


def test_tables_of_the_wrong_shape_are_a_value_error():
    with pytest.raises(ValueError, match="cos shape"):
        rope.rope(jnp.ones((4, 2, 8)), jnp.ones((4, 8)), jnp.ones((4, 4)))
