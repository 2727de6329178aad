"""Pure-jnp ragged paged attention: the ground truth every kernel is tested against.

Queries of all sequences of a step arrive flattened into one token axis `T` and are
grouped per sequence by `query_start_loc`; each sequence's keys and values are read from
the page pool through its row of `page_indices`. The function is also the CPU backend of
the real engine, so it never materialises a `[T, max_context]` gather at once.

Cost: the context is streamed in chunks of `pages_per_chunk` pages with an online softmax,
for `ceil(max(seq_lens) / (pages_per_chunk * S))` iterations (a dynamic trip count: a batch
of short sequences pays for short contexts only). Each iteration gathers
`[K, T, pages_per_chunk * S, H]` keys and values, so over the call it moves
`T * max(seq_lens) * K * H` elements of each and does `4 * T * max(seq_lens) * N * H`
flops; peak extra memory is `O(T * pages_per_chunk * S * (K * H + N))`.
"""

import functools

import jax
import jax.numpy as jnp

# A finite stand-in for -inf: masked scores never turn a running max into NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_sequence_ids(query_start_loc,  # [B+1] int32
                       num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Returns (seq_id [T] int32 clamped to [0, B-1], valid [T] bool) for each token."""
    num_seqs = query_start_loc.shape[0] - 1
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_id = jnp.searchsorted(query_start_loc[1:], tokens, side="right").astype(jnp.int32)
    valid = tokens < query_start_loc[num_seqs]
    return jnp.minimum(seq_id, num_seqs - 1), valid


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "pages_per_chunk"))
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
    pages_per_chunk: int = 8,
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """Causal attention of each sequence's new tokens over its paged context.

    Token `t` of sequence `b` sits at position `seq_lens[b] - (query_start_loc[b+1] - t)` of
    its context and attends to positions `<=` its own (and `> pos - sliding_window` when a
    window is set). GQA: query head `n` reads KV head `n // (N // K)`. With `soft_cap`, scores
    become `soft_cap * tanh(score / soft_cap)` before the softmax.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = page_indices.shape
    group = num_heads // num_kv_heads
    chunk = min(pages_per_chunk, pages_per_seq)
    chunk_tokens = chunk * page_size

    seq_id, valid = token_sequence_ids(query_start_loc, num_tokens)  # [T], [T]
    q_pos = seq_lens[seq_id] - (query_start_loc[seq_id + 1] - jnp.arange(num_tokens))  # [T]
    q_pos = jnp.where(valid, q_pos, -1)  # padding tokens see nothing

    pad = (-pages_per_seq) % chunk
    padded_pages = jnp.pad(page_indices, ((0, 0), (0, pad)))  # [B, P'] pad -> page 0
    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    def body(i, carry):
        m, l, acc = carry  # [T, K, G], [T, K, G], [T, K, G, H]
        pages = jax.lax.dynamic_slice_in_dim(padded_pages, i * chunk, chunk, axis=1)  # [B, C]
        tok_pages = pages[seq_id]  # [T, C]
        k = k_pages[:, tok_pages].reshape(num_kv_heads, num_tokens, chunk_tokens, head_dim)
        v = v_pages[:, tok_pages].reshape(num_kv_heads, num_tokens, chunk_tokens, head_dim)
        kv_pos = i * chunk_tokens + jnp.arange(chunk_tokens)  # [C*S]
        mask = kv_pos[None, :] <= q_pos[:, None]  # [T, C*S]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.einsum("tkgh,ktch->tkgc", qg, k.astype(jnp.float32))  # [T, K, G, C*S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None, :], s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))  # [T, K, G]
        p = jnp.where(mask[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = jnp.where(mask[None, :, :, None], v.astype(jnp.float32), 0.0)  # NaN-safe
        pv = jnp.einsum("tkgc,ktch->tkgh", p, v)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

    max_len = jnp.max(jnp.where(query_start_loc[1:] > query_start_loc[:-1], seq_lens, 0))
    num_chunks = (max_len + chunk_tokens - 1) // chunk_tokens
    init = (jnp.full((num_tokens, num_kv_heads, group), _MASK_VALUE, jnp.float32),
            jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
