"""Ragged paged attention for TPUs: one Pallas Mosaic kernel with scalar-prefetched tables.

The wrapper cuts each sequence's queries into blocks of `BQ` tokens, each laid out per KV
head as one `[G * BQ, H]` tile (head-major rows), so a grid step `(kv_head, q_block)` is one
MXU-shaped problem. It streams its context `PP` pages at a time by async copy from the HBM
pools into a VMEM double buffer, with an online softmax; the tables live in SMEM. 8-bit
pools bring their `[S, 1]` scale columns along in the same copies and are dequantized to the
query dtype in VMEM before the two matmuls.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# A finite stand-in for -inf: masked scores never turn a running max into NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(block_seq_ref,    # [NQB] int32 (SMEM) sequence of each q block
            block_start_ref,  # [NQB] int32 (SMEM) first token of each q block
            lens_ref,         # [B] int32 (SMEM)
            qsl_ref,          # [B+1] int32 (SMEM)
            pages_ref,        # [B, pages_per_seq] int32 (SMEM)
            q_ref,            # [M, H] (VMEM) rows g * BQ + t
            k_hbm,            # [K, P, S, H] (HBM)
            v_hbm,            # [K, P, S, H] (HBM)
            *refs,            # [ks_hbm, vs_hbm] [K, P, S, 1] f32 (HBM) if `quantized`,
                              # [alibi_ref] if `alibi`, o_ref, k_buf, v_buf, sems, m, l, acc,
                              # [ks_buf, vs_buf] [2, PP, S, 1] f32 if `quantized`
            sm_scale: float, soft_cap: float | None, sliding_window: int | None,
            alibi: bool, quantized: bool, group: int):
    ks_hbm, vs_hbm, refs = (*refs[:2], refs[2:]) if quantized else (None, None, refs)
    # alibi_ref [M, BKV] f32 (VMEM): the slope of each row's head, equal along BKV
    alibi_ref, refs = (refs[0], refs[1:]) if alibi else (None, refs)
    (o_ref,    # [M, H] (VMEM)
     k_buf,    # [2, PP, S, H] double buffer
     v_buf,    # [2, PP, S, H]
     sems,     # DMA semaphores [2 (k, v), 2 (slot)]
     m_ref,    # [M, H] f32 running max, equal along H
     l_ref,    # [M, H] f32 running sum, equal along H
     acc_ref,  # [M, H] f32
     *scale_bufs,  # [ks_buf, vs_buf] if `quantized`
     ) = refs
    kv_head, block = pl.program_id(0), pl.program_id(1)
    num_rows, head_dim = q_ref.shape
    _, pages_per_block, page_size, _ = k_buf.shape
    pages_per_seq = pages_ref.shape[1]
    block_kv = pages_per_block * page_size
    block_q = num_rows // group

    seq, t0 = block_seq_ref[block], block_start_ref[block]
    q_end, kv_len = qsl_ref[seq + 1], lens_ref[seq]
    shift = kv_len - q_end  # token t sits at context position t + shift
    kv_hi = jnp.maximum(jnp.minimum(t0 + block_q, q_end) + shift, 0)  # causal end
    kv_lo = jnp.int32(0)
    if sliding_window is not None:
        kv_lo = jnp.maximum(t0 + shift - sliding_window + 1, 0)
    blk_lo = lax.div(kv_lo, block_kv)
    blk_hi = jnp.where(t0 < q_end, lax.div(kv_hi + block_kv - 1, block_kv), blk_lo)
    num_pages = lax.div(kv_hi + page_size - 1, page_size)

    def copies(i, slot):  # the K and V pages of context block i into buffer `slot`
        out = []
        for p in range(pages_per_block):
            pos = i * pages_per_block + p
            page = jnp.where(pos < num_pages,
                             pages_ref[seq, jnp.minimum(pos, pages_per_seq - 1)], 0)
            out.append(pltpu.make_async_copy(k_hbm.at[kv_head, page], k_buf.at[slot, p],
                                             sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[kv_head, page], v_buf.at[slot, p],
                                             sems.at[1, slot]))
            if quantized:  # the scales ride on the same semaphores as their rows
                out.append(pltpu.make_async_copy(ks_hbm.at[kv_head, page],
                                                 scale_bufs[0].at[slot, p], sems.at[0, slot]))
                out.append(pltpu.make_async_copy(vs_hbm.at[kv_head, page],
                                                 scale_bufs[1].at[slot, p], sems.at[1, slot]))
        return out

    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(blk_lo < blk_hi)
    def _():
        for c in copies(blk_lo, 0):
            c.start()

    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def body(i, carry):
        slot = lax.rem(i - blk_lo, 2)

        @pl.when(i + 1 < blk_hi)
        def _():
            for c in copies(i + 1, 1 - slot):
                c.start()

        for c in copies(i, slot):
            c.wait()
        k = k_buf[slot].reshape(block_kv, head_dim)  # [BKV, H]
        v = v_buf[slot].reshape(block_kv, head_dim)  # [BKV, H]
        if quantized:  # 8-bit rows times their scales (a column broadcast along H)
            k_scale = scale_bufs[0][slot].reshape(block_kv, 1).astype(jnp.float32)  # [BKV, 1]
            v_scale = scale_bufs[1][slot].reshape(block_kv, 1).astype(jnp.float32)
            k = (k.astype(jnp.float32) * k_scale).astype(q_ref.dtype)
            v = (v.astype(jnp.float32) * v_scale).astype(q_ref.dtype)
        kv_row = i * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)
        v = jnp.where(kv_row < kv_hi, v.astype(jnp.float32), 0.0).astype(v.dtype)  # NaN-safe
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [M, BKV]
        if soft_cap is None:
            s = s * sm_scale
        else:
            s = soft_cap * jnp.tanh(s * (sm_scale / soft_cap))
        kv_pos = i * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        q_pos = t0 + shift + (lax.broadcasted_iota(jnp.int32, s.shape, 0) & (block_q - 1))
        if alibi:
            s = s + alibi_ref[...] * (kv_pos - q_pos).astype(jnp.float32)
        mask = (kv_pos <= q_pos) & (kv_pos < kv_hi)
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        s = jnp.where(mask, s, _MASK_VALUE)
        m_cur = s.max(axis=1, keepdims=True)  # [M, 1]
        p = jnp.where(mask, jnp.exp(s - m_cur), 0.0)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, m_cur)  # [M, H]
        alpha, beta = jnp.exp(m_prev - m_next), jnp.exp(m_cur - m_next)
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + beta * p.sum(axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + beta * pv
        return carry

    lax.fori_loop(blk_lo, blk_hi, body, jnp.int32(0))
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def default_config(num_tokens: int, num_seqs: int, group: int, page_size: int) -> dict:
    """Block sizes that this kernel uses unless told otherwise."""
    block_q = math.lcm(group, 16) // group  # rows a multiple of 16: whole bf16 tiles
    while num_tokens > 2 * num_seqs and 2 * block_q * group <= 128:
        block_q *= 2  # prefill-heavy bucket: fill the 128-row MXU
    return dict(block_q=block_q, pages_per_block=max(1, 128 // page_size))


def _plan_blocks(query_start_loc, num_tokens: int, block_q: int):
    """Per q block (sequence, first token); per token (its block, row in the block)."""
    num_seqs = query_start_loc.shape[0] - 1
    num_blocks = num_tokens // block_q + num_seqs
    first_block = query_start_loc[:-1] // block_q + jnp.arange(num_seqs, dtype=jnp.int32)
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    block_seq = jnp.clip(jnp.searchsorted(first_block, blocks, side="right") - 1,
                         0, num_seqs - 1).astype(jnp.int32)
    block_start = query_start_loc[block_seq] + (blocks - first_block[block_seq]) * block_q
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = jnp.minimum(jnp.searchsorted(query_start_loc[1:], tokens, side="right"),
                          num_seqs - 1).astype(jnp.int32)
    offset = tokens - query_start_loc[tok_seq]
    tok_block = first_block[tok_seq] + offset // block_q
    return block_seq, block_start, tok_block, offset % block_q, tokens < query_start_loc[-1]


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "block_q", "pages_per_block",
    "vmem_limit_bytes", "interpret"))
def ragged_paged_attention(
    q,                # [T, N, H]
    k_pages,          # [K, P, S, H]
    v_pages,          # [K, P, S, H]
    page_indices,     # [B, pages_per_seq] int32
    seq_lens,         # [B] int32
    query_start_loc,  # [B+1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes=None,  # [N] float32 ALiBi slope of each query head, or None
    k_scales=None,      # [K, P, S, 1] float16 with 8-bit pools (kv_quant.py), else None
    v_scales=None,      # [K, P, S, 1] float16, or None
    block_q: int | None = None,
    pages_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool = False,
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """The reference's semantics on a TPU. Knobs left None take `default_config`.

    block_q: tokens per q block, a power of two (rows = block_q * N // K, best a
    multiple of 16);
    pages_per_block: pages per async-copied context block (best PP * S = 128 or more).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    num_seqs = page_indices.shape[0]
    group = num_heads // num_kv_heads
    cfg = default_config(num_tokens, num_seqs, group, page_size)
    block_q = block_q or cfg["block_q"]
    pages_per_block = pages_per_block or cfg["pages_per_block"]
    if block_q & (block_q - 1):
        raise ValueError(f"block_q={block_q} must be a power of two")
    num_rows = block_q * group

    block_seq, block_start, tok_block, tok_row, tok_valid = _plan_blocks(
        query_start_loc, num_tokens, block_q)
    num_blocks = block_seq.shape[0]
    rows = jnp.minimum(block_start[:, None] + jnp.arange(block_q), num_tokens - 1)
    q_blocks = q[rows].reshape(num_blocks, block_q, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(2, 0, 3, 1, 4).reshape(
        num_kv_heads, num_blocks, num_rows, head_dim)  # [K, NQB, M, H]

    tile = pl.BlockSpec((None, None, num_rows, head_dim), lambda k, j, *_: (k, j, 0, 0))
    pool = pl.BlockSpec(memory_space=pl.ANY)
    kv_buf = pltpu.VMEM((2, pages_per_block, page_size, head_dim), k_pages.dtype)
    f32_tile = pltpu.VMEM((num_rows, head_dim), jnp.float32)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, alibi=alibi_slopes is not None,
                               quantized=k_scales is not None, group=group)
    in_specs, inputs = [tile, pool, pool], [q_blocks, k_pages, v_pages]
    scale_bufs = []
    if k_scales is not None:
        in_specs += [pool, pool]
        inputs += [k_scales, v_scales]
        scale_bufs = [pltpu.VMEM((2, pages_per_block, page_size, 1), k_scales.dtype)] * 2
    if alibi_slopes is not None:  # row g * BQ + t of KV head k: head k * G + g's slope
        block_kv = pages_per_block * page_size
        row_slopes = jnp.repeat(alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, group),
                                block_q, axis=1)  # [K, M]
        inputs.append(jnp.broadcast_to(row_slopes[:, :, None],
                                       (num_kv_heads, num_rows, block_kv)))  # [K, M, BKV]
        in_specs.append(pl.BlockSpec((None, num_rows, block_kv), lambda k, j, *_: (k, 0, 0)))
    out_blocks = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_kv_heads, num_blocks),
            in_specs=in_specs,
            out_specs=tile,
            scratch_shapes=[kv_buf, kv_buf, pltpu.SemaphoreType.DMA((2, 2)),
                            f32_tile, f32_tile, f32_tile, *scale_bufs]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem_limit_bytes),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="ragged_paged_attention_tpu",
    )(block_seq, block_start, seq_lens, query_start_loc, page_indices, *inputs)

    out = out_blocks.reshape(num_kv_heads, num_blocks, group, block_q, head_dim)
    out = out.transpose(1, 3, 0, 2, 4).reshape(num_blocks * block_q, num_heads, head_dim)
    out = out[jnp.minimum(tok_block * block_q + tok_row, num_blocks * block_q - 1)]
    return jnp.where(tok_valid[:, None, None], out, 0).astype(q.dtype)
