"""Paged attention: write this step's keys and values into the pool, then attend over it.

`write_kv` scatters the new K/V rows of all T tokens into one layer's key and value pools
through `slot_mapping` (padding tokens land in the null block 0); a quantized layer (an
8-bit KV cache) has four pools, its rows written quantized with their scales beside them.
`paged_attention` calls the chosen backend: the pure-jnp reference, the Pallas kernels
(GPU/TPU) or the native C++ CPU kernel. Models reach these through `ops.Ops`, which picks
the backend and whether the native row writer runs (`native=`). Host code says *block*,
kernels say *page*: this module is the only place that translates between the two. Under
tensor parallelism (a mesh with a "model" axis > 1) both run under `shard_map` over KV heads.
"""

import jax
import jax.numpy as jnp

from jaxserve.config import ATTENTION_BACKENDS
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.parallel.tensor_parallel import MODEL_AXIS, model_axis_size, shard_over_heads
from pallas_kernels.ragged_paged_attention import kv_quant
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention as reference



def write_kv(pools,         # one layer's pools: (k, v) [K, L, S, H], or for an 8-bit pool
                            # (k, v, k_scale, v_scale) with [K, L, S, 1] float16 scales
             new_k,         # [T, K, H] keys of this step's tokens
             new_v,         # [T, K, H] values of this step's tokens
             slot_mapping,  # [T] int32 block_id * S + offset; padding -> slots of block 0
             *, native: bool = False,
             ) -> tuple[jax.Array, ...]:  # the pools, updated
    """The pools with token t's K/V stored at slot `slot_mapping[t]` of every KV head; an
    8-bit pool stores each row quantized and its scale beside it (`kv_quant.quantize`).
    `native`: see `set_slots`."""
    rows = (new_k, new_v)
    if len(pools) == 4:
        (k, k_scale), (v, v_scale) = (kv_quant.quantize(x, pools[0].dtype) for x in rows)
        rows = (k, v, k_scale, v_scale)  # [T, K, H] x 2, [T, K, 1] x 2

    def write(*args):  # one shard's heads: the rows, then the pools, then the slots
        *pairs, slots = args
        half = len(pairs) // 2
        return tuple(set_slots(pool, slots, new, native=native)
                     for new, pool in zip(pairs[:half], pairs[half:]))

    if model_axis_size() > 1:
        write = shard_over_heads(write, num_head_args=len(rows), num_pool_args=len(pools),
                                 num_outputs=len(pools), pool_outputs=True)
    return write(*rows, *pools, slot_mapping)


def set_slots(pool,   # [..., L, S, W] a paged pool (L blocks of S slots)
              slots,  # [T] int32 slot (block * S + offset) of each new row
              rows,   # [T, ..., W] the new rows, token-major
              *, native: bool = False,
              ) -> jax.Array:  # [..., L, S, W] with rows[t, ..., :] at slot slots[t]
    """A scatter of rows into a pool, in place when the pool is donated.

    With `native` (CPU only), 16- and 8-bit pools go through the native row writer
    (pallas_kernels/cpu/set_rows): XLA:CPU has no bfloat16 or float8 scatter and converts
    the whole pool to float32 (float16) and back around one. Elsewhere a float8 pool
    scatters its bytes (as uint8), never through a wider float.
    """
    rows = rows.astype(pool.dtype)
    if native and pool.dtype.itemsize < 4:
        from pallas_kernels.cpu import set_rows

        return set_rows.set_rows(pool, slots, rows)
    if pool.dtype.itemsize == 1 and jnp.issubdtype(pool.dtype, jnp.floating):
        # XLA:CPU scatters float8 as a float16 round trip of the whole pool: move bytes
        as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8)  # noqa: E731
        return jax.lax.bitcast_convert_type(set_slots(as_bytes(pool), slots, as_bytes(rows)),
                                            pool.dtype)
    *outer, num_blocks, block_size, width = pool.shape
    flat = pool.reshape(*outer, num_blocks * block_size, width)  # [..., L*S, W]
    rows = jnp.moveaxis(rows, 0, -2)  # [..., T, W]
    return flat.at[..., slots, :].set(rows).reshape(pool.shape)


def paged_attention(q,        # [T, N, H] queries of this step's tokens (RoPE applied)
                    pools,    # (k, v) [K, L, S, H], or (k, v, k_scale, v_scale) for an 8-bit
                              # pool (`write_kv`); this step's keys already written
                    metadata: AttentionMetadata,
                    *,
                    backend: str,
                    sm_scale: float,
                    sliding_window: int | None = None,
                    alibi_slopes=None,  # [N] float32 ALiBi slope of every query head, or None
                    ) -> jax.Array:  # [T, N, H]; zero rows for padding tokens
    """Causal attention of each sequence's new tokens over its blocks, by `backend`.

    Under tensor parallelism each rank attends with its own N / TP query heads, so it takes
    the slopes of those heads: the slice at its rank's head offset.
    """
    sharded = model_axis_size() > 1
    num_pools = len(pools)

    def attend(q, *args):
        pools, (block_tables, seq_lens, query_start_loc, slopes) = (args[:num_pools],
                                                                    args[num_pools:])
        if slopes is not None and sharded:  # slopes [N] -> this rank's [N / TP]
            start = jax.lax.axis_index(MODEL_AXIS) * q.shape[1]
            slopes = jax.lax.dynamic_slice_in_dim(slopes, start, q.shape[1])
        k_pool, v_pool, *scales = pools
        k_scales, v_scales = scales or (None, None)
        return _attend(q, k_pool, v_pool, backend=backend, page_indices=block_tables,
                       seq_lens=seq_lens, query_start_loc=query_start_loc, sm_scale=sm_scale,
                       sliding_window=sliding_window, alibi_slopes=slopes,
                       k_scales=k_scales, v_scales=v_scales)

    if sharded:
        attend = shard_over_heads(attend, num_head_args=1, num_pool_args=num_pools,
                                  num_outputs=1, pool_outputs=False)
    return attend(q, *pools, metadata.block_tables, metadata.seq_lens,
                  metadata.query_start_loc, alibi_slopes)


def _attend(q, k_pool, v_pool, *, backend: str, **kwargs) -> jax.Array:  # [T, N, H]
    """One shard's (or the whole model's) attention by `backend`."""
    if backend == "reference":
        return reference(q, k_pool, v_pool, **kwargs)
    if backend == "cpu":
        from pallas_kernels.ragged_paged_attention import cpu

        return cpu.ragged_paged_attention(q, k_pool, v_pool, **kwargs)
    if backend == "pallas":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        if jax.default_backend() == "cpu":  # no Pallas lowering for CPU: interpret the GPU kernel
            return ragged_paged_attention(q, k_pool, v_pool, **kwargs, backend="gpu",
                                          interpret=True)
        return ragged_paged_attention(q, k_pool, v_pool, **kwargs)
    raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
