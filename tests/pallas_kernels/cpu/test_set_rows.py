"""The native row writer stores rows where XLA's scatter would, in place, for every dtype."""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import set_rows

pytestmark = needs_compiler


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
@pytest.mark.parametrize("pool_shape", [(2, 6, 4, 8), (6, 4, 8)], ids=["kv", "latent"])
def test_rows_land_where_xla_scatter_puts_them(dtype, pool_shape, march):
    rng = np.random.default_rng(0)
    *outer, blocks, block_size, width = pool_shape
    pool = jnp.asarray(rng.standard_normal(pool_shape), dtype)
    slots = jnp.asarray([5, 0, 23, 9, 17], jnp.int32)
    rows = jnp.asarray(rng.standard_normal((5, *outer, width)), dtype)  # token-major
    got = set_rows.set_rows(pool, slots, rows, march=march)
    flat = pool.reshape(*outer, blocks * block_size, width)
    want = flat.at[..., slots, :].set(jnp.moveaxis(rows, 0, -2)).reshape(pool_shape)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_a_donated_pool_is_updated_without_a_copy():
    pool = jnp.zeros((2, 64, 16, 8), jnp.bfloat16)  # [K, L, S, H]
    slots = jnp.arange(4, dtype=jnp.int32)
    rows = jnp.ones((4, 2, 8), jnp.bfloat16)
    step = jax.jit(set_rows.set_rows, donate_argnums=0)
    hlo = step.lower(pool, slots, rows).compile().as_text()
    assert not re.search(r"\bcopy\(|copy[_a-z]*fusion", hlo), hlo
    out = step(pool, slots, rows)
    assert float(out[1, 0, 3, 7]) == 1.0 and float(out[1, 1, 0, 0]) == 0.0


def test_a_slot_outside_the_pool_fails_the_call():
    pool = jnp.zeros((2, 4, 16, 8), jnp.bfloat16)
    with pytest.raises(Exception, match="outside the pool"):
        jax.block_until_ready(set_rows.set_rows(pool, jnp.asarray([64], jnp.int32),
                                                jnp.ones((1, 2, 8), jnp.bfloat16)))


def test_mismatched_rows_are_a_value_error():
    pool = jnp.zeros((2, 4, 16, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows shape"):
        set_rows.set_rows(pool, jnp.zeros((3,), jnp.int32), jnp.ones((3, 8), jnp.bfloat16))
