"""Pure-jnp ragged paged attention: the ground truth every kernel is tested against.

Queries of all sequences of a step arrive flattened into one token axis `T` and are
grouped per sequence by `query_start_loc`; each sequence's keys and values are read from
the page pool through its row of `page_indices`. It is also the engine's CPU backend, so it
never materialises a `[T, max_context]` gather; the context is streamed in chunks of
`pages_per_chunk` pages with an online softmax, in one of two formulations picked from the
static shapes (the same numbers either way):

- per token (decode-heavy steps, T < 4B): each chunk gathers `[K, T, chunk, H]`, for
  `ceil(max(seq_lens) / chunk)` iterations; it moves `T * max(seq_lens) * K * H` elements.
- per query block (prefill-heavy steps): a loop over (sequence, block of `block_q` tokens)
  work items, each gathering its own sequence's chunks once for `block_q` tokens; it moves
  about `(T / block_q + B) * context * K * H` elements, 4x less time for a 512-token chunk.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.kv_quant import dequantize

# A finite stand-in for -inf: masked scores never turn a running max into NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Per-block formulation when T >= this many times B (measured crossover on CPU: a decode
# step with T == B is 5x faster per token, a 512-token prefill 4x faster per block).
_BLOCKED_MIN_TOKENS_PER_SEQ = 4
_BLOCK_Q = 16


def token_sequence_ids(query_start_loc,  # [B+1] int32
                       num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Returns (seq_id [T] int32 clamped to [0, B-1], valid [T] bool) for each token."""
    num_seqs = query_start_loc.shape[0] - 1
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_id = jnp.searchsorted(query_start_loc[1:], tokens, side="right").astype(jnp.int32)
    valid = tokens < query_start_loc[num_seqs]
    return jnp.minimum(seq_id, num_seqs - 1), valid


def _softmax_step(carry, qg, k, v, kv_pos, q_pos, *, sliding_window, soft_cap, alibi):
    """One online-softmax update over a chunk of C context positions.

    qg [Q, K, G, H]; k, v [K, Q, C, H] (one context per query row) or [K, C, H] (one
    context shared by all rows); kv_pos [C]; q_pos [Q] (-1: the row sees nothing);
    alibi [K, G] float32 slopes or None;
    carry = (running max [Q, K, G], running sum [Q, K, G], accumulator [Q, K, G, H]).
    """
    m, l, acc = carry
    shared = k.ndim == 3
    mask = kv_pos[None, :] <= q_pos[:, None]  # [Q, C]
    if sliding_window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
    s = jnp.einsum("qkgh,kch->qkgc" if shared else "qkgh,kqch->qkgc", qg, k.astype(jnp.float32))
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if alibi is not None:  # slope * (key position - query position): <= 0 where kept
        distance = (kv_pos[None, :] - q_pos[:, None]).astype(jnp.float32)  # [Q, C]
        s = s + alibi[None, :, :, None] * distance[:, None, None, :]
    s = jnp.where(mask[:, None, None, :], s, _MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    # Zero V where no score is kept: unread slots may hold NaN, and 0 * NaN is NaN.
    seen = mask.any(axis=0)[None, :, None] if shared else mask[None, :, :, None]
    v = jnp.where(seen, v.astype(jnp.float32), 0.0)
    pv = jnp.einsum("qkgc,kch->qkgh" if shared else "qkgc,kqch->qkgh", p, v)
    return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv


def _init(num_rows, num_kv_heads, group, head_dim):
    return (jnp.full((num_rows, num_kv_heads, group), _MASK_VALUE, jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group, head_dim), jnp.float32))


def _finish(carry):
    _, l, acc = carry
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _read(pool, scales, ids, shape):
    """The pages `ids` of a pool as `shape`; a quantized pool's rows times their scales."""
    rows = pool[:, ids].reshape(shape)
    if scales is None:
        return rows
    return dequantize(rows, scales[:, ids].reshape(*shape[:-1], 1))


def _per_token(qg, k_pages, v_pages, pages, seq_lens, qsl, *, chunk, k_scales, v_scales,
               **opts):
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    chunk_tokens = chunk * k_pages.shape[2]
    seq_id, valid = token_sequence_ids(qsl, num_tokens)  # [T], [T]
    q_pos = seq_lens[seq_id] - (qsl[seq_id + 1] - jnp.arange(num_tokens))
    q_pos = jnp.where(valid, q_pos, -1)  # padding tokens see nothing

    def body(i, carry):
        tok_pages = jax.lax.dynamic_slice_in_dim(pages, i * chunk, chunk, axis=1)[seq_id]
        shape = (num_kv_heads, num_tokens, chunk_tokens, head_dim)
        k = _read(k_pages, k_scales, tok_pages, shape)
        v = _read(v_pages, v_scales, tok_pages, shape)
        kv_pos = i * chunk_tokens + jnp.arange(chunk_tokens)
        return _softmax_step(carry, qg, k, v, kv_pos, q_pos, **opts)

    max_len = jnp.max(jnp.where(qsl[1:] > qsl[:-1], seq_lens, 0))
    num_chunks = (max_len + chunk_tokens - 1) // chunk_tokens
    init = _init(num_tokens, num_kv_heads, group, head_dim)
    return _finish(jax.lax.fori_loop(0, num_chunks, body, init))


def _per_block(qg, k_pages, v_pages, pages, seq_lens, qsl, *, chunk, block_q, k_scales,
               v_scales, **opts):
    num_tokens, num_kv_heads, group, head_dim = qg.shape
    chunk_tokens = chunk * k_pages.shape[2]
    blocks = (qsl[1:] - qsl[:-1] + block_q - 1) // block_q  # [B] work items per sequence
    ends = jnp.cumsum(blocks)
    qg = jnp.pad(qg, ((0, block_q), (0, 0), (0, 0), (0, 0)))  # slices never run off the end
    window = opts["sliding_window"]

    def item(i, out):  # out [T + block_q, K, G, H]
        b = jnp.searchsorted(ends, i, side="right")
        start = qsl[b] + (i - ends[b] + blocks[b]) * block_q
        rows = start + jnp.arange(block_q)
        valid = rows < qsl[b + 1]
        q_pos = jnp.where(valid, seq_lens[b] - (qsl[b + 1] - rows), -1)  # [block_q]
        q_block = jax.lax.dynamic_slice_in_dim(qg, start, block_q)

        def body(c, carry):
            ids = jax.lax.dynamic_slice_in_dim(pages[b], c * chunk, chunk)  # [C]
            shape = (num_kv_heads, chunk_tokens, head_dim)
            k = _read(k_pages, k_scales, ids, shape)
            v = _read(v_pages, v_scales, ids, shape)
            kv_pos = c * chunk_tokens + jnp.arange(chunk_tokens)
            return _softmax_step(carry, q_block, k, v, kv_pos, q_pos, **opts)

        first = 0
        if window is not None:
            lowest = jnp.min(jnp.where(valid, q_pos, jnp.iinfo(jnp.int32).max))
            first = jnp.maximum(lowest - window + 1, 0) // chunk_tokens
        last = (jnp.max(q_pos) + chunk_tokens) // chunk_tokens
        init = _init(block_q, num_kv_heads, group, head_dim)
        result = _finish(jax.lax.fori_loop(first, last, body, init))
        old = jax.lax.dynamic_slice_in_dim(out, start, block_q)
        new = jnp.where(valid[:, None, None, None], result, old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, start, axis=0)

    out = jnp.zeros((num_tokens + block_q, num_kv_heads, group, head_dim), jnp.float32)
    return jax.lax.fori_loop(0, ends[-1], item, out)[:num_tokens]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "pages_per_chunk", "block_q"))
def ragged_paged_attention(
    q,                # [T, N, H] queries of every scheduled token
    k_pages,          # [K, P, S, H] key pool (P pages of S tokens)
    v_pages,          # [K, P, S, H] value pool
    page_indices,     # [B, pages_per_seq] int32 page ids of each sequence's context
    seq_lens,         # [B] int32 context length of each sequence, this step's tokens included
    query_start_loc,  # [B+1] int32 first token of each sequence in T; padding seqs are empty
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes=None,  # [N] float32 ALiBi slope of each query head, or None
    pages_per_chunk: int = 8,
    block_q: int | None = None,
    k_scales=None,    # [K, P, S, 1] float16 when the pools are 8-bit (kv_quant.py), or None
    v_scales=None,    # [K, P, S, 1] float16, or None
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """Causal attention of each sequence's new tokens over its paged context.

    Token `t` of sequence `b` sits at position `seq_lens[b] - (query_start_loc[b+1] - t)` of
    its context and attends to positions `<=` its own (and `> pos - sliding_window` when a
    window is set). GQA: query head `n` reads KV head `n // (N // K)`. With `soft_cap`, scores
    become `soft_cap * tanh(score / soft_cap)` before the softmax. With `alibi_slopes`, head
    `n` then adds `alibi_slopes[n] * (key_pos - query_pos)` (ALiBi: BLOOM, Baichuan-13B).
    `block_q` picks the formulation: 0 per token, > 0 per query block of that size, None by
    the shapes. 8-bit pools come with `k_scales` / `v_scales` and are read dequantized.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    num_seqs, pages_per_seq = page_indices.shape
    chunk = min(pages_per_chunk, pages_per_seq)
    pages = jnp.pad(page_indices, ((0, 0), (0, (-pages_per_seq) % chunk)))  # pad -> page 0
    qg = (q.astype(jnp.float32) * sm_scale).reshape(
        num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if block_q is None:
        block_q = _BLOCK_Q if num_tokens >= _BLOCKED_MIN_TOKENS_PER_SEQ * num_seqs else 0
    alibi = (None if alibi_slopes is None else
             alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, num_heads // num_kv_heads))
    opts = dict(chunk=chunk, sliding_window=sliding_window, soft_cap=soft_cap, alibi=alibi,
                k_scales=k_scales, v_scales=v_scales)
    args = (qg, k_pages, v_pages, pages, seq_lens, query_start_loc)
    out = _per_block(*args, block_q=block_q, **opts) if block_q else _per_token(*args, **opts)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
