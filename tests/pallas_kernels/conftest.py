"""Fixtures of the kernel tests.

`make_batch` builds ragged batches for the attention kernel tests: a shuffled page pool in
which every slot that no sequence may read (unused pages, the null page 0, the tail of each
sequence's last page) holds NaN, so any stray read shows up in the output.
`march` runs a native CPU kernel test once per build target this CPU can execute
(`jaxserve.testing.native_kernels.kernel_marches`).
"""

import numpy as np
import pytest

import jax.numpy as jnp

from jaxserve.testing.native_kernels import kernel_marches
from pallas_kernels.ragged_paged_attention import kv_pool_shape


@pytest.fixture(params=kernel_marches())
def march(request) -> str:
    """The -march a native kernel test builds its kernel for."""
    return request.param


def build_batch(q_lens, kv_lens, *, num_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                num_tokens=None, dtype=jnp.float32, extra_pages=3, seed=0):
    """Returns (q, k_pages, v_pages, page_indices, seq_lens, query_start_loc)."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    num_tokens = num_tokens or max(sum(q_lens), 1)
    assert sum(q_lens) <= num_tokens and all(q <= kv for q, kv in zip(q_lens, kv_lens))
    pages_needed = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = max(max(pages_needed), 1) + 1  # one padded entry at least
    num_pages = 1 + sum(pages_needed) + extra_pages  # page 0 is the null page
    order = rng.permutation(np.arange(1, num_pages))
    page_indices = np.zeros((num_seqs, pages_per_seq), np.int32)  # padding -> page 0
    shape = kv_pool_shape(num_kv_heads, num_pages, page_size, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    used = 0
    for b, (n, kv_len) in enumerate(zip(pages_needed, kv_lens)):
        page_indices[b, :n] = order[used:used + n]
        used += n
        for pos in range(kv_len):  # only the readable slots get finite values
            page, slot = page_indices[b, pos // page_size], pos % page_size
            k[:, page, slot] = rng.standard_normal((num_kv_heads, head_dim))
            v[:, page, slot] = rng.standard_normal((num_kv_heads, head_dim))
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(page_indices), jnp.asarray(np.asarray(kv_lens, np.int32)),
            jnp.asarray(query_start_loc))


@pytest.fixture
def make_batch():
    return build_batch
