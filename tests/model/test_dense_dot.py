"""dense_dot and the gated MLP run the native CPU GEMM where it applies and XLA's dot
elsewhere, with the same numbers either way."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.model.layers import dense_dot
from jaxserve.testing.native_kernels import needs_compiler

pytestmark = needs_compiler


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_float32_dense_dot_is_the_native_gemm_with_xla_numbers(layout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48) if layout == "kn" else (48, 64)), jnp.float32)
    fn = lambda x, w: dense_dot(x, w, w_layout=layout)  # noqa: E731
    assert "jaxserve_matmul_f32" in _hlo(fn, x, w)
    spec = "tk,kn->tn" if layout == "kn" else "tk,nk->tn"
    want = jnp.einsum(spec, x, w, precision="highest")
    np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_ask_for_float32_and_get_it():
    x = jnp.ones((3, 32), jnp.bfloat16)
    w = jnp.full((10, 32), 0.5, jnp.bfloat16)
    out = dense_dot(x, w, w_layout="nk", preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and float(out[0, 0]) == 16.0


def test_mixed_dtypes_and_the_environment_switch_keep_xlas_dot(monkeypatch):
    x, w = jnp.ones((3, 32), jnp.float32), jnp.ones((32, 8), jnp.bfloat16)
    assert "jaxserve_matmul" not in _hlo(dense_dot, x, w)
    monkeypatch.setenv("JAXSERVE_CPU_GEMM", "xla")
    assert "jaxserve_matmul" not in _hlo(dense_dot, x, x.T)


def test_a_build_without_simd_microkernels_keeps_xlas_dot(monkeypatch):
    # x86-64-v2 (no AVX2): the portable loops are slower than XLA's dot
    from pallas_kernels.cpu import build, matmul

    if not build.can_execute("x86-64-v2"):
        pytest.skip("not an x86-64 CPU")
    assert not matmul.vectorized("x86-64-v2") and matmul.vectorized("x86-64-v3")
    x, w = jnp.ones((3, 32), jnp.float32), jnp.ones((32, 8), jnp.float32)
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v2")  # read when tracing: fresh lambdas
    assert "jaxserve_matmul" not in _hlo(lambda x, w: dense_dot(x, w), x, w)
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v3")
    if build.can_execute("x86-64-v3"):
        assert "jaxserve_matmul_f32_kn__x86_64_v3" in _hlo(lambda x, w: dense_dot(x, w), x, w)


def test_gated_mlp_runs_as_one_native_call_with_xlas_numbers(monkeypatch):
    from flax import nnx

    from jaxserve.model.layers import MLP

    mlp = MLP(32, 48, hf_name="mlp", use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((7, 32)), jnp.float32)
    graphdef, state = nnx.split(mlp)
    run = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    assert "jaxserve_gated_mlp_f32" in _hlo(run, state, x)
    native = run(state, x)
    monkeypatch.setenv("JAXSERVE_CPU_GEMM", "xla")
    run_xla = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731 (a fresh trace)
    assert "jaxserve_" not in _hlo(run_xla, state, x)
    np.testing.assert_allclose(np.asarray(native), np.asarray(jax.jit(run_xla)(state, x)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_head_argmax_is_one_native_call_with_the_logits_argmax(dtype):
    from jaxserve.model.layers import tied_head_argmax

    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((9, 64)), dtype)
    embedding = jnp.asarray(rng.standard_normal((1000, 64)), dtype)
    assert "jaxserve_lm_head_argmax" in _hlo(tied_head_argmax, hidden, embedding)
    logits = np.asarray(hidden, np.float64) @ np.asarray(embedding, np.float64).T
    np.testing.assert_array_equal(np.asarray(tied_head_argmax(hidden, embedding)),
                                  logits.argmax(axis=-1))
    assert tied_head_argmax(hidden, embedding.astype(jnp.float16)) is None  # XLA's turn


def test_rotary_runs_the_native_kernel_with_xlas_numbers(monkeypatch):
    from jaxserve.model.layers import Rotary

    rotary = Rotary(64, 10000.0)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((9, 4, 64)), jnp.float32)
    positions = jnp.arange(9, dtype=jnp.int32) * 37
    native = lambda x, p: rotary(x, p)  # noqa: E731
    assert "jaxserve_rope_cpu" in _hlo(native, x, positions)
    got = jax.jit(native)(x, positions)
    monkeypatch.setenv("JAXSERVE_CPU_GEMM", "xla")
    xla = lambda x, p: rotary(x, p)  # noqa: E731 (a fresh trace)
    assert "jaxserve_" not in _hlo(xla, x, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(xla)(x, positions)),
                               rtol=1e-6, atol=1e-6)


def test_rows_skip_the_padding_rows_on_the_native_gemm_only(monkeypatch):
    """`rows` (the step's real tokens, traced): the native MLP computes those rows, as
    without it, and leaves zeros below; XLA's dot ignores it and computes them all."""
    from flax import nnx

    from jaxserve.model.layers import MLP

    mlp = MLP(32, 48, hf_name="mlp", use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((12, 32)), jnp.float32)
    graphdef, state = nnx.split(mlp)
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    part = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, rows=r))(state, x, jnp.int32(5))
    np.testing.assert_allclose(np.asarray(part[:5]), np.asarray(full[:5]), rtol=1e-5,
                               atol=1e-6)
    assert not np.asarray(part[5:]).any()
    monkeypatch.setenv("JAXSERVE_CPU_GEMM", "xla")
    xla = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, rows=r))(state, x, jnp.int32(5))
    np.testing.assert_allclose(np.asarray(xla), np.asarray(full), rtol=1e-5, atol=1e-6)
