"""Each kernel, run by the Pallas interpreter on CPU, matches the pure-jnp reference.

The interpreter takes seconds per call, so the default run takes each batch case, dtype, knob
set and option once (each kernel sees both dtypes, and `test_entry_point_runs_the_named_kernel`
runs both on one more batch); the remaining combinations are marked slow.
"""

import itertools
import re

import numpy as np
import pytest

import jax.numpy as jnp

import pallas_kernels.ragged_paged_attention as rpa
from pallas_kernels.ragged_paged_attention import cpu, gpu, tpu

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
KERNELS = {"gpu": gpu.ragged_paged_attention, "tpu": tpu.ragged_paged_attention}

# name: (q_lens, kv_lens, num_tokens or None, heads (N, K), head_dim, page_size)
CASES = {
    "decode_only": ([1, 1, 1, 1], [5, 16, 17, 33], None, (4, 2), 64, 16),
    "prefill_only": ([16, 7], [16, 7], None, (8, 1), 128, 16),
    "mixed_with_prefix_hits": ([1, 9, 4], [31, 9, 20], 16, (6, 1), 64, 32),
    "padded_seqs_and_tokens": ([3, 0, 1, 0], [3, 0, 16, 0], 8, (2, 2), 64, 16),
    "lengths_around_page_boundaries": ([1, 2, 1, 3, 1], [15, 16, 17, 64, 65], None, (4, 1),
                                       64, 64),
}


def _check(out, ref, batch, dtype):
    q_lens = np.diff(np.asarray(batch[5]))
    num_real = int(np.asarray(batch[5])[-1])
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == batch[0].shape
    assert np.isfinite(out).all(), "NaN or inf: a stray read of a poisoned slot"
    np.testing.assert_array_equal(out[num_real:], 0.0, err_msg="padding rows not zero")
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out[:num_real], ref[:num_real], atol=tol, rtol=tol)
    assert q_lens.sum() == num_real


def _default_or_slow(combos, default):
    """pytest.params of `combos` (tuples), marked slow unless in `default`."""
    return [pytest.param(*c, marks=() if c in default else pytest.mark.slow) for c in combos]


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# Default: every case once, the dtypes alternating; the TPU kernel (the slower to interpret)
# takes the prefill, the GPU kernel the others.
CASE_COMBOS = _default_or_slow(
    list(itertools.product(KERNELS, CASES, DTYPES)),
    {("tpu" if case == "prefill_only" else "gpu", case, list(DTYPES)[i % 2])
     for i, case in enumerate(CASES)})


@pytest.mark.parametrize("backend,case,dtype", CASE_COMBOS)
def test_kernel_matches_reference(backend, case, dtype, make_batch):
    dtype = DTYPES[dtype]
    q_lens, kv_lens, num_tokens, (n, k), head_dim, page_size = CASES[case]
    batch = make_batch(q_lens, kv_lens, num_heads=n, num_kv_heads=k, head_dim=head_dim,
                       page_size=page_size, num_tokens=num_tokens, dtype=dtype)
    ref = rpa.reference_attention(*batch, sm_scale=head_dim ** -0.5)
    out = KERNELS[backend](*batch, sm_scale=head_dim ** -0.5, interpret=True)
    _check(out, ref, batch, dtype)


KNOBS = {"gpu-splits3": ("gpu", dict(num_splits=3, block_n=16)),
         "gpu-splits2-block_q4": ("gpu", dict(num_splits=2, block_q=4, block_n=32)),
         "tpu-pages1": ("tpu", dict(pages_per_block=1, block_q=2))}
OPTIONS = {"sliding_window": dict(sliding_window=5), "soft_cap": dict(soft_cap=2.0)}


# Default: each knob set once; the GPU kernel with both options, the TPU kernel with one.
@pytest.mark.parametrize("knob_set,option", _default_or_slow(
    list(itertools.product(KNOBS, OPTIONS)),
    {("gpu-splits3", "sliding_window"), ("gpu-splits2-block_q4", "soft_cap"),
     ("tpu-pages1", "soft_cap")}))
def test_kernel_knobs_and_options_match_reference(knob_set, option, make_batch):
    (backend, knobs), extras = KNOBS[knob_set], OPTIONS[option]
    batch = make_batch([1, 6, 2], [40, 6, 19], num_heads=8, num_kv_heads=2, num_tokens=12)
    ref = rpa.reference_attention(*batch, sm_scale=0.3, **extras)
    out = KERNELS[backend](*batch, sm_scale=0.3, interpret=True, **knobs, **extras)
    _check(out, ref, batch, jnp.float32)


# name: (q_lens, kv_lens, num_tokens, heads (N, K), page_size, knobs per kernel)
ALIBI_CASES = {
    "mixed_with_prefix_hits_mha": ([1, 9, 4, 0], [31, 9, 20, 0], 16, (4, 4), 16,
                                   dict(gpu=dict(), tpu=dict())),
    "decode_gqa_splits": ([1, 1, 2], [40, 17, 33], 8, (4, 2), 16,
                          dict(gpu=dict(num_splits=2, block_n=16), tpu=dict(pages_per_block=1))),
}


# Default: each case once, each kernel once.
@pytest.mark.parametrize("backend,case", _default_or_slow(
    list(itertools.product(KERNELS, ALIBI_CASES)),
    {("gpu", "decode_gqa_splits"), ("tpu", "mixed_with_prefix_hits_mha")}))
def test_kernel_with_alibi_matches_reference(backend, case, make_batch):
    q_lens, kv_lens, num_tokens, (n, k), page_size, knobs = ALIBI_CASES[case]
    batch = make_batch(q_lens, kv_lens, num_heads=n, num_kv_heads=k, page_size=page_size,
                       num_tokens=num_tokens)
    slopes = jnp.asarray(2.0 ** -np.arange(1, n + 1), jnp.float32)  # [N]
    ref = rpa.reference_attention(*batch, sm_scale=0.125, alibi_slopes=slopes)
    out = KERNELS[backend](*batch, sm_scale=0.125, alibi_slopes=slopes, interpret=True,
                           **knobs[backend])
    _check(out, ref, batch, jnp.float32)


def test_entry_point_names_an_alibi_slopes_mismatch(make_batch):
    batch = make_batch([1], [3])  # 4 q heads
    with pytest.raises(ValueError, match=re.escape("alibi_slopes shape (3,) != (4,)")):
        rpa.ragged_paged_attention(*batch, sm_scale=1.0, alibi_slopes=jnp.ones(3))


@pytest.mark.parametrize("group", [3, pytest.param(5, marks=pytest.mark.slow),
                                   pytest.param(7, marks=pytest.mark.slow)])
def test_gpu_kernel_pads_odd_gqa_groups(group, make_batch):
    batch = make_batch([1, 3], [18, 3], num_heads=group, num_kv_heads=1)
    ref = rpa.reference_attention(*batch, sm_scale=0.125)
    out = gpu.ragged_paged_attention(*batch, sm_scale=0.125, interpret=True)
    _check(out, ref, batch, jnp.float32)


def test_entry_point_runs_the_named_kernel(make_batch):
    batch = make_batch([2, 1], [9, 30])
    ref = rpa.reference_attention(*batch, sm_scale=0.125)
    for backend in rpa.BACKENDS:
        out = rpa.ragged_paged_attention(*batch, sm_scale=0.125, backend=backend,
                                         interpret=True)
        _check(out, ref, batch, jnp.float32)


def test_entry_point_picks_the_native_kernel_on_cpu(make_batch):
    batch = make_batch([1], [3])
    assert rpa.default_backend(batch[0]) == ("cpu" if cpu.available() else "reference")
    out = rpa.ragged_paged_attention(*batch, sm_scale=1.0)
    _check(out, rpa.reference_attention(*batch, sm_scale=1.0), batch, jnp.float32)


@pytest.mark.parametrize("change,message", [
    (dict(k_pages=(2, 4, 16, 96), v_pages=(2, 4, 16, 96)), "k_pages head_dim 96 != q head_dim 64"),
    (dict(v_pages=(2, 5, 16, 64)), "v_pages shape (2, 5, 16, 64) != k_pages shape"),
    (dict(q=(3, 5, 64)), "q heads 5 is not a multiple of kv heads 2"),
    (dict(seq_lens=(3,)), "seq_lens shape (3,) != (2,)"),
    (dict(query_start_loc=(2,)), "query_start_loc shape (2,) != (3,)"),
    (dict(q=(3, 4, 80), k_pages=(2, 4, 16, 80), v_pages=(2, 4, 16, 80)), "head_dim 80 not in"),
])
def test_entry_point_names_static_mismatches(change, message):
    shapes = dict(q=(3, 4, 64), k_pages=(2, 4, 16, 64), v_pages=(2, 4, 16, 64),
                  page_indices=(2, 2), seq_lens=(2,), query_start_loc=(3,))
    shapes.update(change)
    args = [jnp.zeros(shape, jnp.int32 if name in ("page_indices", "seq_lens",
                                                   "query_start_loc") else jnp.float32)
            for name, shape in shapes.items()]
    with pytest.raises(ValueError, match=re.escape(message)):
        rpa.ragged_paged_attention(*args, sm_scale=1.0, backend="gpu")


def test_entry_point_rejects_another_backends_knob():
    args = [jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 16, 64)), jnp.zeros((1, 2, 16, 64)),
            jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32),
            jnp.array([0, 1], jnp.int32)]
    with pytest.raises(ValueError, match="num_splits"):
        rpa.ragged_paged_attention(*args, sm_scale=1.0, backend="tpu", num_splits=2)

