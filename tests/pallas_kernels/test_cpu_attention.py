"""The native CPU kernel (C++ XLA FFI) matches the pure-jnp reference on NaN-poisoned pools.

The default run takes every batch case once, the dtypes alternating; the other dtype of each
case is marked slow.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels.ragged_paged_attention as rpa
from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.ragged_paged_attention import cpu

pytestmark = needs_compiler

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

# name: (q_lens, kv_lens, num_tokens or None, heads (N, K), head_dim, page_size)
CASES = {
    "decode_only": ([1, 1, 1, 1], [5, 16, 17, 33], None, (4, 2), 64, 16),
    "prefill_only": ([16, 7], [16, 7], None, (8, 1), 128, 16),
    "long_prefill_many_query_blocks": ([70, 1], [100, 3], 80, (4, 1), 64, 16),
    "mixed_with_prefix_hits": ([1, 9, 4], [31, 9, 20], 16, (6, 1), 64, 32),
    "padded_seqs_and_tokens": ([3, 0, 1, 0], [3, 0, 16, 0], 8, (2, 2), 64, 16),
    "lengths_around_page_boundaries": ([1, 2, 1, 3, 1], [15, 16, 17, 64, 65], None, (4, 1),
                                       64, 64),
    "head_dim_not_a_multiple_of_16": ([2, 1], [9, 30], None, (4, 2), 40, 16),
    "head_dim_256_mha": ([3, 1], [3, 18], None, (2, 2), 256, 16),
}


def _check(out, ref, batch, dtype):
    num_real = int(np.asarray(batch[5])[-1])
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == batch[0].shape and out.dtype == np.float32
    assert np.isfinite(out).all(), "NaN or inf: a stray read of a poisoned slot"
    np.testing.assert_array_equal(out[num_real:], 0.0, err_msg="padding rows not zero")
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out[:num_real], ref[:num_real], atol=tol, rtol=tol)


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@pytest.mark.parametrize("case,dtype", [
    pytest.param(case, dtype, id=f"{case}-{dtype}",
                 marks=() if (i + j) % 2 == 0 else pytest.mark.slow)
    for i, case in enumerate(CASES) for j, dtype in enumerate(DTYPES)])
def test_cpu_kernel_matches_reference(case, dtype, make_batch, march):
    dtype = DTYPES[dtype]
    q_lens, kv_lens, num_tokens, (n, k), head_dim, page_size = CASES[case]
    batch = make_batch(q_lens, kv_lens, num_heads=n, num_kv_heads=k, head_dim=head_dim,
                       page_size=page_size, num_tokens=num_tokens, dtype=dtype)
    ref = rpa.reference_attention(*batch, sm_scale=head_dim ** -0.5)
    out = cpu.ragged_paged_attention(*batch, sm_scale=head_dim ** -0.5, march=march)
    assert out.dtype == dtype
    _check(out, ref, batch, dtype)


@pytest.mark.parametrize("extras", [dict(sliding_window=5), dict(soft_cap=2.0),
                                    dict(sliding_window=16, soft_cap=30.0)],
                         ids=["sliding_window", "soft_cap", "both"])
def test_cpu_kernel_options_match_reference(extras, make_batch, march):
    batch = make_batch([1, 6, 2, 40], [40, 6, 19, 45], num_heads=8, num_kv_heads=2,
                       num_tokens=52)
    ref = rpa.reference_attention(*batch, sm_scale=0.3, **extras)
    out = cpu.ragged_paged_attention(*batch, sm_scale=0.3, march=march, **extras)
    _check(out, ref, batch, jnp.float32)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_cpu_kernel_with_alibi_matches_reference(heads, make_batch, march):
    n, k = heads
    batch = make_batch([1, 9, 4, 0], [31, 9, 20, 0], num_heads=n, num_kv_heads=k,
                       num_tokens=16)
    slopes = jnp.asarray(2.0 ** -np.arange(1, n + 1), jnp.float32)  # [N]
    ref = rpa.reference_attention(*batch, sm_scale=0.125, alibi_slopes=slopes)
    out = cpu.ragged_paged_attention(*batch, sm_scale=0.125, alibi_slopes=slopes, march=march)
    _check(out, ref, batch, jnp.float32)


def test_cpu_kernel_runs_under_jit_with_the_pool_updated_in_the_same_program(make_batch):
    q, k, v, pages, seq_lens, qsl = make_batch([1, 1], [20, 33], num_heads=4, num_kv_heads=2)
    new_k = jnp.full((2, 64), 0.5, jnp.float32)  # [K, H] the last key of sequence 0

    @jax.jit
    def step(q, k, v):
        page, slot = pages[0, 19 // 16], 19 % 16
        k = k.at[:, page, slot].set(new_k)
        return k, cpu.ragged_paged_attention(q, k, v, pages, seq_lens, qsl, sm_scale=0.125)

    k_new, out = step(q, k, v)
    ref = rpa.reference_attention(q, k_new, v, pages, seq_lens, qsl, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_cpu_kernel_rejects_a_page_id_outside_the_pool(make_batch):
    q, k, v, pages, seq_lens, qsl = make_batch([1], [20], num_heads=4, num_kv_heads=2)
    bad = pages.at[0, 0].set(k.shape[1] + 5)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(cpu.ragged_paged_attention(q, k, v, bad, seq_lens, qsl,
                                                         sm_scale=0.125))
