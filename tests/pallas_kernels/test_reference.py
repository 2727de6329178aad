"""The reference itself, both formulations, against a plain numpy loop on NaN-poisoned pools.

ALiBi: each head adds `slope * (key_pos - query_pos)` to its scores in both formulations.
The default run takes each formulation, batch and option once (`_diagonal`); the other
combinations are marked slow.
"""

import itertools

import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention


def numpy_attention(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc, *,
                    sm_scale, sliding_window=None, soft_cap=None, alibi_slopes=None):
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    qsl = np.asarray(query_start_loc)
    for b, length in enumerate(np.asarray(seq_lens)):
        slots = [(page_indices[b][p // page_size], p % page_size) for p in range(length)]
        k = np.stack([k_pages[:, page, slot] for page, slot in slots], 1) if slots else None
        v = np.stack([v_pages[:, page, slot] for page, slot in slots], 1) if slots else None
        q_len = qsl[b + 1] - qsl[b]
        for i, t in enumerate(range(qsl[b], qsl[b + 1])):
            pos = length - q_len + i
            seen = np.arange(length) <= pos
            if sliding_window:
                seen &= np.arange(length) > pos - sliding_window
            for n in range(q.shape[1]):
                s = k[n // group] @ q[t, n] * sm_scale
                if soft_cap:
                    s = soft_cap * np.tanh(s / soft_cap)
                if alibi_slopes is not None:
                    s = s + float(alibi_slopes[n]) * (np.arange(length) - pos)
                s = np.where(seen, s, -np.inf)
                p = np.exp(s - s.max())
                out[t, n] = (p / p.sum()) @ np.where(seen[:, None], v[n // group], 0)
    return out


def _diagonal(*axes):
    """pytest.params of every combination of `axes` (lists of (id, value)), marked slow but
    for the i-th value of every axis together (i up to the longest axis, shorter axes
    wrapping around): each value of each axis stays in the default run."""
    default = {tuple(i % len(axis) for axis in axes) for i in range(max(map(len, axes)))}
    return [pytest.param(*(axis[i][1] for axis, i in zip(axes, index)),
                         id="-".join(str(axis[i][0]) for axis, i in zip(axes, index)),
                         marks=() if index in default else pytest.mark.slow)
            for index in itertools.product(*(range(len(axis)) for axis in axes))]


BLOCK_Q = [(0, 0), (16, 16), (4, 4)]  # 0: the whole-sequence formulation; else query blocks


@pytest.mark.parametrize("block_q,lens,options", _diagonal(BLOCK_Q, [
    ("decode", ([1, 1, 1, 1], [1, 16, 17, 70])),
    ("prefill", ([40, 3, 17], [40, 35, 50])),      # prefill chunks and prefix hits
    ("padding", ([0, 5, 0, 33], [0, 30, 0, 33])),  # padding sequences between real ones
], [("plain", {}), ("window", dict(sliding_window=20)), ("soft_cap", dict(soft_cap=2.0))]))
def test_both_formulations_match_numpy(make_batch, block_q, lens, options):
    q_lens, kv_lens = lens
    batch = make_batch(q_lens, kv_lens, num_heads=4, num_kv_heads=2, head_dim=16,
                       num_tokens=sum(q_lens) + 5)
    got = np.asarray(ragged_paged_attention(*batch, sm_scale=0.3, pages_per_chunk=2,
                                            block_q=block_q, **options))
    want = numpy_attention(*batch, sm_scale=0.3, **options)
    np.testing.assert_allclose(got[:sum(q_lens)], want[:sum(q_lens)], atol=2e-5)
    assert np.all(got[sum(q_lens):] == 0)  # padding tokens


@pytest.mark.parametrize("block_q,lens,num_kv_heads", _diagonal(BLOCK_Q, [
    ("decode", ([1, 1, 1, 1], [1, 16, 17, 70])),
    ("prefill", ([40, 3, 0, 17], [40, 35, 0, 50])),  # chunks, prefix hits, a padding seq
], [("mha", 4), ("gqa", 2)]))
def test_alibi_matches_numpy_in_both_formulations(make_batch, block_q, lens, num_kv_heads):
    q_lens, kv_lens = lens
    batch = make_batch(q_lens, kv_lens, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
                       num_tokens=sum(q_lens) + 5)
    slopes = np.array([0.5, 0.25, 0.0625, 0.03], np.float32)  # [N]
    got = np.asarray(ragged_paged_attention(*batch, sm_scale=0.3, pages_per_chunk=2,
                                            block_q=block_q, alibi_slopes=slopes))
    want = numpy_attention(*batch, sm_scale=0.3, alibi_slopes=slopes)
    np.testing.assert_allclose(got[:sum(q_lens)], want[:sum(q_lens)], atol=2e-5)
    assert np.all(got[sum(q_lens):] == 0)  # padding tokens
    plain = np.asarray(ragged_paged_attention(*batch, sm_scale=0.3, block_q=block_q))
    assert np.abs(plain - got)[:sum(q_lens)].max() > 1e-2  # the bias changes the output
