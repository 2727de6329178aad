"""Ragged paged attention on CPU: the C++ XLA FFI kernel (pallas_kernels/cpu/*.cc).

Pallas has no CPU lowering, so this is a native handler with the reference's exact
contract: it reads each sequence's pages in place (no gather copies; 8-bit pools widened
page by page with their row scales), streams them through an online softmax, and runs
(sequence, KV head, query block) work items on XLA's intra-op thread pool. `available()`
says whether it builds here (a C++ compiler is needed).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import build

_LIBRARY = "ragged_paged_attention"
_TARGETS = ("ragged_paged_attention_cpu",)


def available(march: str | None = None) -> bool:
    """Whether the native kernel builds and registers on this machine for `march` (see
    `build.resolve_march`)."""
    return build.available(_LIBRARY, _TARGETS, march)


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
    k_scales=None,      # [K, P, S, 1] float16 with 8-bit pools (kv_quant.py), else None
    v_scales=None,      # [K, P, S, 1] float16, or None
    march: str | None = None,  # the build target (default $JAXSERVE_CPU_MARCH, else native)
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """The reference's semantics (see reference.ragged_paged_attention), run natively.

    Metadata pointing outside the pools (a page id >= P, a sequence longer than its page
    row) fails the call with an XLA runtime error instead of reading out of bounds.
    """
    none = jnp.zeros((0,), jnp.float32)  # an absent optional input
    slopes = none if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    if k_scales is None:
        k_scales = v_scales = jnp.zeros((0,), jnp.float16)
    call = jax.ffi.ffi_call(build.ffi_target(_LIBRARY, _TARGETS, _TARGETS[0], march),
                            jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc, slopes,
                k_scales, v_scales,
                sm_scale=np.float32(sm_scale), sliding_window=np.int32(sliding_window or 0),
                soft_cap=np.float32(soft_cap or 0.0))
