"""Pure-jnp paged attention over MLA latents, in the absorbed form used for every step.

With the key and value up-projections absorbed into the query and output sides, MLA is
multi-query attention over the latent pool: query head `n` carries `q_latent[n]` (its
no-RoPE query times W_UK, C wide) and `q_rope[n]` (Hr wide); the score against context
token `j` is `q_latent[n] . c_j + q_rope[n] . k_rope_j`, and the output is the softmax-weighted
sum of the latents `c_j` (C wide), which the caller multiplies by W_UV. The pool row of a
token is `[c_j, k_rope_j]`, so this is ragged paged attention with one KV head of width
C + Hr whose values are the first C columns of the keys: it runs through the ragged
reference (`pallas_kernels.ragged_paged_attention.reference`) with the pool as both keys and
values and keeps the first C output columns.

GPU/TPU: the ragged kernels take head dims 64/128/256 with values as wide as keys, while
MLA needs 576-wide keys (512 + 64) and 512-wide values shared by 16-128 query heads; until a
dedicated latent kernel exists, the `pallas` attention backend serves MLA with this reference
(XLA fuses it; memory traffic is the latent pool, 1/57 of the equivalent per-head K/V).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def mla_paged_attention(
    q_latent,         # [T, N, C] no-RoPE queries times W_UK (the absorbed key up-projection)
    q_rope,           # [T, N, Hr] RoPE part of the queries, rotated
    latent_pages,     # [P, S, C + Hr] latent pool: [c_j, k_rope_j] per token
    page_indices,     # [B, pages_per_seq] int32 page ids of each sequence's context
    seq_lens,         # [B] int32 context length of each sequence, this step's tokens included
    query_start_loc,  # [B+1] int32 first token of each sequence in T; padding seqs are empty
    *,
    sm_scale: float,
) -> jax.Array:       # [T, N, C] attention-weighted latents; rows of padding tokens are zero
    """Causal attention of each sequence's new tokens over its paged latents (see module)."""
    num_tokens, num_heads, rank = q_latent.shape
    rope_dim = q_rope.shape[-1]
    if q_rope.shape[:2] != (num_tokens, num_heads):
        raise ValueError(f"q_rope shape {q_rope.shape} does not match q_latent {q_latent.shape}")
    if latent_pages.ndim != 3 or latent_pages.shape[-1] != rank + rope_dim:
        raise ValueError(f"latent_pages must be [P, S, {rank} + {rope_dim}], "
                         f"got {latent_pages.shape}")
    q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)  # [T, N, C + Hr]
    pages = latent_pages[None].astype(q.dtype)  # [1, P, S, C + Hr]: one shared KV head
    out = ragged_paged_attention(q, pages, pages, page_indices, seq_lens, query_start_loc,
                                 sm_scale=sm_scale)  # [T, N, C + Hr]
    return out[..., :rank]
