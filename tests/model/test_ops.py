"""Ops: the kernels are chosen once (`select_ops`); the native CPU ones run where chosen and
XLA's elsewhere, with the same numbers either way."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.model.ops import Ops, select_ops
from jaxserve.testing.native_kernels import needs_compiler

NATIVE, XLA = Ops(native_dense=True), Ops()


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_an_unknown_attention_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        Ops(attention_backend="flash")


@needs_compiler
def test_select_ops_takes_the_native_kernels_on_cpu_only_without_tensor_parallelism():
    from pallas_kernels.cpu import matmul

    ops = select_ops("cpu")
    assert ops.attention_backend == "cpu" and ops.native_kv_write
    assert ops.native_dense == matmul.vectorized()  # AVX2 or AVX-512 here: True
    assert not select_ops("cpu", tensor_parallel_size=2).native_dense  # no sharding rule
    assert select_ops("cpu", tensor_parallel_size=2).native_kv_write  # runs per shard
    assert select_ops("pallas", platform="gpu") == Ops(attention_backend="pallas")


@needs_compiler
def test_a_build_without_simd_microkernels_selects_xlas_dot(monkeypatch):
    # x86-64-v2 (no AVX2): the portable loops are slower than XLA's dot
    from pallas_kernels.cpu import build

    if not build.can_execute("x86-64-v3"):
        pytest.skip("not an x86-64-v3 CPU")
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v2")
    assert not select_ops("cpu").native_dense
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v3")
    ops = select_ops("cpu")
    assert ops.native_dense
    x = jnp.ones((3, 32), jnp.float32)
    assert "jaxserve_matmul_f32_kn__x86_64_v3" in _hlo(lambda x: ops.dense(x, x.T, None), x)


@needs_compiler
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_float32_dense_is_the_native_gemm_with_xla_numbers(layout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48) if layout == "kn" else (48, 64)), jnp.float32)
    fn = lambda x, w: NATIVE.dense(x, w, None, w_layout=layout)  # noqa: E731
    assert "jaxserve_matmul_f32" in _hlo(fn, x, w)
    assert "jaxserve_" not in _hlo(lambda x, w: XLA.dense(x, w, None, w_layout=layout), x, w)
    spec = "tk,kn->tn" if layout == "kn" else "tk,nk->tn"
    want = jnp.einsum(spec, x, w, precision="highest")
    np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_bfloat16_logits_ask_for_float32_and_get_it():
    x = jnp.ones((3, 32), jnp.bfloat16)
    w = jnp.full((10, 32), 0.5, jnp.bfloat16)
    out = NATIVE.dense(x, w, None, w_layout="nk", out_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and float(out[0, 0]) == 16.0


@needs_compiler
def test_mixed_or_16_bit_float_dtypes_keep_xlas_dot():
    x, w = jnp.ones((3, 32), jnp.float32), jnp.ones((32, 8), jnp.bfloat16)
    assert "jaxserve_matmul" not in _hlo(lambda x, w: NATIVE.dense(x, w, None), x, w)
    h = jnp.ones((3, 32), jnp.float16)
    assert "jaxserve_matmul" not in _hlo(lambda h: NATIVE.dense(h, h.T, None), h)


@needs_compiler
def test_the_gated_mlp_is_one_native_call_that_skips_padding_rows():
    """`num_rows` (the step's real tokens, traced): the native call computes those rows and
    leaves zeros below; XLA's dot computes them all. Same numbers on the real rows."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((12, 32)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((32, 48)), jnp.float32) for _ in range(2))
    native = lambda x, r: NATIVE.gated_mlp(x, w_gate, w_up, r)  # noqa: E731
    assert "jaxserve_gated_mlp_f32" in _hlo(native, x, jnp.int32(5))
    want = jax.nn.silu(x @ w_gate) * (x @ w_up)
    part = native(x, jnp.int32(5))
    np.testing.assert_allclose(np.asarray(part[:5]), np.asarray(want[:5]), rtol=1e-5,
                               atol=1e-5)
    assert not np.asarray(part[5:]).any()
    xla = XLA.gated_mlp(x, w_gate, w_up, jnp.int32(5))
    np.testing.assert_allclose(np.asarray(xla), np.asarray(want), rtol=1e-5, atol=1e-5)
    biased = NATIVE.gated_mlp(x, w_gate, w_up, None, jnp.ones(48), jnp.ones(48))  # XLA's
    np.testing.assert_allclose(np.asarray(biased),
                               np.asarray(jax.nn.silu(x @ w_gate + 1) * (x @ w_up + 1)),
                               rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_tied_head_argmax_is_one_native_call_with_the_logits_argmax(dtype):
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((9, 64)), dtype)
    embedding = jnp.asarray(rng.standard_normal((1000, 64)), dtype)
    fused = lambda h, e: NATIVE.lm_head_argmax(h, e, None)  # noqa: E731
    assert "jaxserve_lm_head_argmax" in _hlo(fused, hidden, embedding)
    logits = np.asarray(hidden, np.float64) @ np.asarray(embedding, np.float64).T
    np.testing.assert_array_equal(np.asarray(fused(hidden, embedding)), logits.argmax(-1))
    transposed = NATIVE.lm_head_argmax(hidden, embedding, None, jnp.transpose(embedding))
    np.testing.assert_array_equal(np.asarray(transposed), logits.argmax(-1))
    assert NATIVE.lm_head_argmax(hidden, embedding.astype(jnp.float16), None) is None
    assert XLA.lm_head_argmax(hidden, embedding, None) is None  # the caller's argmax


@needs_compiler
def test_rotary_runs_the_native_kernel_with_xlas_numbers():
    from jaxserve.model.layers import Rotary

    x = jnp.asarray(np.random.default_rng(3).standard_normal((9, 4, 64)), jnp.float32)
    positions = jnp.arange(9, dtype=jnp.int32) * 37
    native, xla = Rotary(64, 10000.0, ops=NATIVE), Rotary(64, 10000.0, ops=XLA)
    assert "jaxserve_rope_cpu" in _hlo(native, x, positions)
    assert "jaxserve_" not in _hlo(xla, x, positions)
    np.testing.assert_allclose(np.asarray(jax.jit(native)(x, positions)),
                               np.asarray(jax.jit(xla)(x, positions)), rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_narrow_pools_are_written_by_the_native_row_writer_where_chosen(dtype):
    pool = jnp.zeros((2, 4, 16, 8), dtype)  # [K, L, S, H]
    rows = jnp.ones((3, 2, 8), jnp.float32)  # [T, K, H]
    slots = jnp.asarray([17, 18, 40], jnp.int32)
    native = lambda p, r: Ops(native_kv_write=True).write_rows(p, slots, r)  # noqa: E731
    assert "jaxserve_set_rows" in _hlo(native, pool, rows)
    got, want = native(pool, rows), XLA.write_rows(pool, slots, rows)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
