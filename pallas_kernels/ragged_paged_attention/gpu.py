"""Ragged paged attention for GPUs: one Pallas kernel lowered through Triton.

A program owns `BQ` tokens of one sequence times the query heads of one KV head, streams the
sequence's context in `BN`-token tiles (each token's page looked up in the block table) with
an online softmax, and writes its rows; decode and prefill share one launch. 8-bit pools
widen to the query dtype in registers, their per-row scales applied to the scores (keys)
and to the probabilities (values). Small batches
split long contexts over `NS` programs whose partial results a jnp epilogue merges.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# A finite stand-in for -inf: masked scores never turn a running max into NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_NUM_SMS_DEFAULT = 132  # H100 SXM; used only when the device does not say


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _find_sequence(qsl_ref, block, *, num_seqs: int, block_q: int):
    """The last b in [0, B] whose first q block `qsl[b] // BQ + b` is <= `block`.

    Sequence b owns q blocks [qsl[b] // BQ + b, ... + cdiv(q_len_b, BQ)); b == B is the
    run of padding tokens [qsl[B], T), whose programs write zeros. The starts strictly
    increase, so a fixed-depth binary search over scalar loads finds the owner.
    """
    lo, hi = jnp.int32(0), jnp.int32(num_seqs)
    for _ in range(max(1, num_seqs.bit_length())):
        mid = lax.div(lo + hi + 1, 2)
        ok = lax.div(qsl_ref[mid], block_q) + mid <= block
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    return lo


def _kernel(q_ref,       # [T, N, H]
            k_ref,       # [K, P, S, H]
            v_ref,       # [K, P, S, H]
            pages_ref,   # [B, pages_per_seq] int32
            lens_ref,    # [B] int32
            qsl_ref,     # [B+1] int32
            *refs,       # k and v scales [K, P, S] f16 if `quantized`; alibi [N] f32 if
                         # `alibi`; then o [T, N, H], or o [NS, T, N, H] f32 and
                         # lse [NS, T, N] f32
            sm_scale: float, soft_cap: float | None, sliding_window: int | None,
            alibi: bool, quantized: bool, block_q: int, group_pad: int, block_n: int,
            num_splits: int):
    ks_ref, vs_ref, refs = (*refs[:2], refs[2:]) if quantized else (None, None, refs)
    alibi_ref, out_refs = (refs[0], refs[1:]) if alibi else (None, refs)
    num_tokens, num_heads, head_dim = q_ref.shape
    num_kv_heads, _, page_size, _ = k_ref.shape
    num_seqs = lens_ref.shape[0]
    group = num_heads // num_kv_heads
    block, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    seq = _find_sequence(qsl_ref, block, num_seqs=num_seqs, block_q=block_q)
    is_real = seq < num_seqs
    real_seq = jnp.minimum(seq, num_seqs - 1)
    q_begin = qsl_ref[seq]
    q_end = jnp.where(is_real, qsl_ref[jnp.minimum(seq + 1, num_seqs)], num_tokens)
    kv_len = jnp.where(is_real, lens_ref[real_seq], 0)
    t0 = q_begin + (block - lax.div(q_begin, block_q) - seq) * block_q
    t_stop = jnp.minimum(t0 + block_q, q_end)  # rows [t0, t_stop) are this program's
    shift = kv_len - q_end  # token t sits at context position t + shift

    # Tiles of context this program reads: causal end, sliding-window start, its split.
    kv_hi = jnp.maximum(t_stop + shift, 0)
    kv_lo = jnp.int32(0)
    if sliding_window is not None:
        kv_lo = jnp.maximum(t0 + shift - sliding_window + 1, 0)
    tile_lo = lax.div(kv_lo, block_n)
    tile_hi = jnp.where(t0 < q_end, lax.div(kv_hi + block_n - 1, block_n), tile_lo)
    per_split = lax.div(tile_hi - tile_lo + num_splits - 1, num_splits)
    my_lo = tile_lo + split * per_split
    my_hi = jnp.minimum(my_lo + per_split, tile_hi)

    rows = jnp.arange(block_q * group_pad, dtype=jnp.int32)
    tok = t0 + lax.div(rows, group_pad)  # [BM]
    head = kv_head * group + lax.rem(rows, group_pad)  # [BM]
    row_ok = (tok < q_end) & (lax.rem(rows, group_pad) < group)
    q_pos = tok + shift  # [BM]
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    q = plgpu.load(q_ref.at[tok[:, None], head[:, None], dims[None, :]],
                   mask=row_ok[:, None], other=0)  # [BM, H]
    if alibi:  # each row's slope, in log2 units like the scores
        slope = plgpu.load(alibi_ref.at[head], mask=lax.rem(rows, group_pad) < group,
                           other=0) * _LOG2E  # [BM]
    # Triton takes a float32 dot at DEFAULT precision as TF32 (~1e-3 error): ask for IEEE.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry):
        m, l, acc = carry  # [BM], [BM], [BM, H] f32; m and scores in log2 units
        kv_pos = i * block_n + jnp.arange(block_n, dtype=jnp.int32)  # [BN]
        kv_ok = kv_pos < kv_hi
        page = plgpu.load(pages_ref.at[real_seq, lax.div(kv_pos, page_size)], mask=kv_ok,
                          other=0)
        at = (kv_head, page[:, None], lax.rem(kv_pos, page_size)[:, None], dims[None, :])
        if quantized:  # 8-bit rows widen exactly; their scales multiply scores and probs
            # (Triton takes no 8-bit `other`: masked lanes are zeroed after widening)
            k, v = (jnp.where(kv_ok[:, None], plgpu.load(ref.at[at], mask=kv_ok[:, None])
                              .astype(q.dtype), 0) for ref in (k_ref, v_ref))  # [BN, H]
            row = (kv_head, page, lax.rem(kv_pos, page_size))
            k_scale, v_scale = (plgpu.load(ref.at[row], mask=kv_ok, other=0)
                                .astype(jnp.float32) for ref in (ks_ref, vs_ref))  # [BN]
        else:
            k = plgpu.load(k_ref.at[at], mask=kv_ok[:, None], other=0)  # [BN, H]
            v = plgpu.load(v_ref.at[at], mask=kv_ok[:, None], other=0)  # [BN, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [BM, BN]
        if quantized:
            s = s * k_scale[None, :]
        if soft_cap is None:
            s = s * (sm_scale * _LOG2E)
        else:
            s = (soft_cap * _LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
        if alibi:
            s = s + slope[:, None] * (kv_pos[None, :] - q_pos[:, None]).astype(jnp.float32)
        mask = kv_ok[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        pv_weights = p * v_scale[None, :] if quantized else p
        pv = lax.dot_general(pv_weights.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + pv

    num_rows = block_q * group_pad
    init = (jnp.full((num_rows,), _MASK_VALUE, jnp.float32),
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows, head_dim), jnp.float32))
    m, l, acc = lax.fori_loop(my_lo, my_hi, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    if num_splits == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[tok[:, None], head[:, None], dims[None, :]],
                    out.astype(o_ref.dtype), mask=row_ok[:, None])
    else:
        o_ref, lse_ref = out_refs
        plgpu.store(o_ref.at[split, tok[:, None], head[:, None], dims[None, :]], out,
                    mask=row_ok[:, None])
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)) * _LOG2E, _MASK_VALUE)
        plgpu.store(lse_ref.at[split, tok, head], lse, mask=row_ok)


def _merge_splits(o,    # [NS, T, N, H] f32 partial outputs, each normalised
                  lse,  # [NS, T, N] f32 log2-sum-exp of each split's scores
                  ) -> jax.Array:  # [T, N, H] f32
    """Weights each split by its share of the softmax mass (empty splits weigh 0)."""
    w = jnp.exp2(lse - lse.max(axis=0))  # [NS, T, N]
    return (w[..., None] * o).sum(axis=0) / w.sum(axis=0)[..., None]


def default_config(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, max_context: int, dtype) -> dict:
    """Block sizes, split count and launch shape used unless told otherwise."""
    group_pad = _next_pow2(num_heads // num_kv_heads)
    decode_heavy = num_tokens <= 2 * num_seqs
    block_q = max(1, (16 if decode_heavy else 64) // group_pad)
    itemsize = jnp.dtype(dtype).itemsize
    block_n = 64 if itemsize <= 2 else 32
    stage_bytes = 2 * block_n * head_dim * itemsize  # one K and one V tile
    try:
        num_sms = int(getattr(jax.devices()[0], "core_count", 0)) or _NUM_SMS_DEFAULT
    except RuntimeError:
        num_sms = _NUM_SMS_DEFAULT
    busy_blocks = max(min(num_seqs, num_tokens), num_tokens // block_q)
    busy = busy_blocks * num_kv_heads  # programs with work, about
    max_splits = max(1, max_context // (2 * block_n))  # keep >= 2 tiles per split
    num_splits = 1
    # Split until ~2 programs per SM have work: on an H100 this beat ~1.5 per SM in 6 of
    # the 7 decode cases (batch >= 16, context >= 1k) where the two differ (RESULTS.md).
    while 2 * num_splits <= max_splits and busy * num_splits < 2 * num_sms:
        num_splits *= 2
    return dict(block_q=block_q, block_n=block_n, num_splits=num_splits, num_warps=4,
                num_stages=3 if 3 * stage_bytes <= 128 * 1024 else 2)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "block_q", "block_n", "num_splits",
    "num_warps", "num_stages", "interpret"))
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
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """The reference's semantics on a GPU. Knobs left None take `default_config`.

    block_q: tokens per program (rows = block_q * next_pow2(N // K): a power of two >= 16);
    block_n: context tokens per tile (a power of two >= 16); num_splits: programs that
    share one q block's context (1 leaves out the merge epilogue).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    num_seqs, pages_per_seq = page_indices.shape
    cfg = default_config(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim,
                         pages_per_seq * k_pages.shape[2], q.dtype)
    given = dict(block_q=block_q, block_n=block_n, num_splits=num_splits,
                 num_warps=num_warps, num_stages=num_stages)
    cfg.update({name: value for name, value in given.items() if value is not None})
    group_pad = _next_pow2(num_heads // num_kv_heads)
    block_q, num_splits = cfg["block_q"], cfg["num_splits"]
    for name, size in (("block_q * next_pow2(N // K)", block_q * group_pad),
                       ("block_n", cfg["block_n"])):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} = {size} must be a power of two >= 16 (Triton)")

    num_blocks = num_tokens // block_q + num_seqs + 1  # + 1: the padding tokens' run
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        alibi=alibi_slopes is not None, quantized=k_scales is not None, block_q=block_q,
        group_pad=group_pad, block_n=cfg["block_n"], num_splits=num_splits)
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((num_splits, *q.shape), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, num_tokens, num_heads), jnp.float32))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_blocks, num_kv_heads, num_splits),
        compiler_params=plgpu.CompilerParams(num_warps=cfg["num_warps"],
                                             num_stages=cfg["num_stages"]),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc,
      *(() if k_scales is None else (k_scales[..., 0], v_scales[..., 0])),
      *(() if alibi_slopes is None else (alibi_slopes.astype(jnp.float32),)))
    if num_splits == 1:
        return out
    return _merge_splits(*out).astype(q.dtype)
