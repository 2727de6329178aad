"""Ragged paged attention: the public entry point and the page-pool layout.

The pool layout is declared here, once, because the kernels choose it: per layer one key
pool and one value pool, each `[K, P, S, H]` (KV heads, pages, page size, head dim). A page
of one KV head is then one contiguous `[S, H]` tile: a single async copy on TPU with (S, H)
as the (sublane, lane) dims, one coalesced load on GPU, and TP shards axis 0.
"""

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention as reference_attention


def kv_pool_shape(num_kv_heads: int, num_pages: int, page_size: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer's key pool (and, identically, its value pool): [K, P, S, H]."""
    return (num_kv_heads, num_pages, page_size, head_dim)


__all__ = ["kv_pool_shape", "reference_attention"]
