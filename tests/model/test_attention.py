"""write_kv scatters rows into the pool through slot_mapping; backends are chosen by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.attention import paged_attention, write_kv
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.ragged_paged_attention import kv_pool_shape, kv_quant

K, L, S, H = 2, 4, 4, 8


def _metadata(num_tokens: int = 4) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=jnp.arange(num_tokens, dtype=jnp.int32) + S * 2,
        block_tables=jnp.array([[2, 0]], jnp.int32), seq_lens=jnp.array([num_tokens], jnp.int32),
        query_start_loc=jnp.array([0, num_tokens], jnp.int32),
        logits_indices=jnp.array([num_tokens - 1], jnp.int32))


def test_write_kv_puts_each_token_at_its_slot_and_leaves_the_rest():
    pool = jnp.zeros(kv_pool_shape(K, L, S, H))  # [K, L, S, H]
    new_k = jnp.arange(3 * K * H, dtype=jnp.float32).reshape(3, K, H) + 1  # [T, K, H]
    slots = jnp.array([1 * S + 3, 3 * S + 0, 0], jnp.int32)  # block 1 off 3, block 3 off 0, null
    k_pool, v_pool = write_kv((pool, pool), new_k, -new_k, slots)
    np.testing.assert_array_equal(k_pool[:, 1, 3], new_k[0])
    np.testing.assert_array_equal(k_pool[:, 3, 0], new_k[1])
    np.testing.assert_array_equal(v_pool[:, 3, 0], -new_k[1])
    assert int(jnp.count_nonzero(k_pool[:, 2])) == 0  # untouched block stays zero
    assert int(jnp.count_nonzero(k_pool)) == 3 * K * H


def test_write_kv_casts_to_the_pool_dtype():
    pool = jnp.zeros(kv_pool_shape(K, L, S, H), jnp.bfloat16)
    k_pool, _ = write_kv((pool, pool), jnp.ones((1, K, H)), jnp.ones((1, K, H)),
                         jnp.array([S], jnp.int32))
    assert k_pool.dtype == jnp.bfloat16 and float(k_pool[0, 1, 0, 0]) == 1.0


def test_attention_metadata_is_a_pytree_of_its_five_arrays():
    metadata = _metadata()
    assert len(jax.tree.leaves(metadata)) == 5
    doubled = jax.jit(lambda m: jax.tree.map(lambda x: x * 2, m))(metadata)
    assert isinstance(doubled, AttentionMetadata)
    np.testing.assert_array_equal(doubled.seq_lens, [8])


def test_unknown_backend_is_rejected_by_name():
    q = jnp.zeros((4, 2 * K, H))
    pool = jnp.zeros(kv_pool_shape(K, L, S, H))
    with pytest.raises(ValueError, match="attention backend must be one of"):
        paged_attention(q, (pool, pool), _metadata(), backend="flash", sm_scale=1.0)


def test_pallas_backend_calls_the_public_kernel_entry_interpreted_on_cpu(monkeypatch):
    import pallas_kernels.ragged_paged_attention as rpa

    calls = []

    def fake_kernel(q, k_pages, v_pages, **kwargs):
        calls.append(kwargs)
        return q

    monkeypatch.setattr(rpa, "ragged_paged_attention", fake_kernel, raising=False)
    q = jnp.zeros((4, 2 * K, H))
    pool = jnp.zeros(kv_pool_shape(K, L, S, H))
    metadata = _metadata()
    paged_attention(q, (pool, pool), metadata, backend="pallas", sm_scale=0.5, sliding_window=3)
    (kwargs,) = calls
    assert kwargs.pop("page_indices") is metadata.block_tables  # blocks become pages here
    assert kwargs.pop("seq_lens") is metadata.seq_lens
    assert kwargs.pop("query_start_loc") is metadata.query_start_loc
    # On CPU the GPU kernel runs interpreted; elsewhere the entry picks by platform.
    on_cpu = dict(backend="gpu", interpret=True) if jax.default_backend() == "cpu" else {}
    assert kwargs == dict(sm_scale=0.5, sliding_window=3, alibi_slopes=None, k_scales=None,
                          v_scales=None, **on_cpu)


@pytest.mark.parametrize("kv_dtype,native", [
    pytest.param(jnp.float8_e4m3fn, False, marks=pytest.mark.slow), (jnp.int8, False),
    pytest.param(jnp.int8, True, marks=needs_compiler)])  # native: the row writer
def test_write_kv_stores_8_bit_rows_with_their_scales_at_each_slot(kv_dtype, native):
    pools = (jnp.zeros(kv_pool_shape(K, L, S, H), kv_dtype),) * 2 + (
        jnp.zeros(kv_quant.scale_pool_shape(K, L, S), kv_quant.SCALE_DTYPE),) * 2
    rng = np.random.default_rng(0)
    new_k = jnp.asarray(rng.standard_normal((3, K, H)), jnp.float32)  # [T, K, H]
    slots = jnp.array([1 * S + 3, 3 * S + 0, 0], jnp.int32)
    write = jax.jit(functools.partial(write_kv, native=native))
    k_pool, v_pool, k_scale, v_scale = write(pools, new_k, 2 * new_k, slots)
    assert k_pool.dtype == kv_dtype and k_scale.dtype == jnp.float16
    for t, (block, offset) in enumerate([(1, 3), (3, 0)]):
        stored, scale = kv_quant.quantize(new_k[t], kv_dtype)  # the row format, per head
        np.testing.assert_array_equal(k_pool[:, block, offset], stored)
        np.testing.assert_array_equal(k_scale[:, block, offset], scale)
        np.testing.assert_allclose(v_scale[:, block, offset], 2 * scale, rtol=1e-6)
        back = kv_quant.dequantize(v_pool[:, block, offset], v_scale[:, block, offset])
        # within 1/16 of the row's absmax (e4m3's 3 mantissa bits; int8 is finer)
        np.testing.assert_allclose(back, 2 * new_k[t], atol=float(jnp.abs(2 * new_k[t]).max()) / 16)
    assert int(jnp.count_nonzero(k_scale[:, 2])) == 0  # untouched block stays zero


def test_a_float8_pool_is_scattered_as_bytes_not_through_a_wider_float():
    pool = jnp.zeros(kv_pool_shape(K, L, S, H), jnp.float8_e4m3fn)
    rows = jnp.full((1, K, H), 1.5)
    write = jax.jit(lambda p: write_kv((p, p), rows, rows, jnp.array([S], jnp.int32))[0])
    hlo = write.lower(pool).compile().as_text()
    assert "f16[" not in hlo and "f32[2,16,8]" not in hlo  # no whole-pool float copy
    assert float(write(pool)[1, 1, 0, 3]) == 1.5
