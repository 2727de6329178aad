"""The native CPU GEMM against a float64 numpy matmul: both layouts, float32 and bfloat16,
M, N and K off the SIMD widths (tails, odd K for the bf16 K-pairs), batch dims, jit; float32
results of bfloat16 products; the fused gated MLP silu(x @ w_gate) * (x @ w_up)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.testing.native_kernels import kernel_marches, needs_compiler
from pallas_kernels.cpu import matmul as native

pytestmark = needs_compiler


def _march_params(*, portable_slow: bool):
    return [pytest.param(m, marks=pytest.mark.slow if portable_slow and not native.vectorized(m)
                         else ()) for m in kernel_marches()]


# Each test that computes takes `march`: it runs once per build target this CPU can execute
# (AVX-512 BF16, AVX-512, AVX2 + FMA, x86-64-v2). The portable build (no SIMD microkernels,
# x86-64-v2) is slow here but in test_matches_numpy (`any_march`): the engine keeps XLA's
# dot where the GEMM is not vectorized (`matmul.vectorized`).
@pytest.fixture(params=_march_params(portable_slow=True))
def march(request) -> str:
    return request.param


@pytest.fixture(params=_march_params(portable_slow=False))
def any_march(request) -> str:
    return request.param

# (M, K, N): M over 1, row tails and the W-packing thresholds (nk: M 16 bf16 / 64 f32;
# kn: M 256 or K 1024); N over column tails and partial 64-wide panels; K odd, off 16 and
# 32, and 1.
SHAPES = [(1, 512, 512), (3, 17, 33), (64, 96, 200), (65, 513, 100), (16, 130, 70),
          (17, 33, 129), (5, 1, 7), (64, 512, 1536), (2, 47, 16), (96, 64, 64),
          (261, 35, 150), (40, 1025, 70), (256, 1024, 80)]


def inputs(m, k, n, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
    w_shape = (k, n) if layout == "kn" else (n, k)
    w = jnp.asarray(rng.standard_normal(w_shape), dtype)  # [K, N] or [N, K]
    return x, w


def reference(x, w, layout):
    """float64 x @ W on exactly the (possibly bf16-rounded) inputs, and sum |x| |W|."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)  # [M, K]
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    w64 = w64 if layout == "kn" else w64.T  # [K, N]
    return x64 @ w64, np.abs(x64) @ np.abs(w64)


def check(y, x, w, layout):
    ref, scale = reference(x, w, layout)
    got = np.asarray(y.astype(jnp.float32), np.float64)
    assert got.shape == ref.shape
    tol = 1e-5 * scale + 1e-30  # float32 accumulation
    if y.dtype == jnp.bfloat16:
        tol = tol + 2.0 ** -8 * np.abs(ref)  # one rounding to bf16 (half an ulp is 2^-9)
    err = np.abs(got - ref)
    assert np.all(err <= tol), f"max error {err.max()} where tol {tol[np.argmax(err - tol)]}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_numpy(m, k, n, layout, dtype, any_march):
    x, w = inputs(m, k, n, layout, dtype)
    y = native.matmul(x, w, w_layout=layout, march=any_march)
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, x, w, layout)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_jit_batch_dims(layout, march):
    x, w = inputs(2 * 35, 72, 90, layout, jnp.bfloat16, seed=1)
    x3 = x.reshape(2, 35, 72)  # [B, T, K]
    y3 = jax.jit(lambda a, b: native.matmul(a, b, w_layout=layout, march=march))(x3, w)  # [B, T, N]
    assert y3.shape == (2, 35, 90)
    check(y3.reshape(70, 90), x, w, layout)


def test_f32_bit_close_to_xla(march):
    x, w = inputs(64, 512, 640, "kn", jnp.float32, seed=2)
    np.testing.assert_allclose(np.asarray(native.matmul(x, w, march=march)),
                               np.asarray(jnp.dot(x, w, precision="highest")),
                               rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    x, w = inputs(4, 8, 12, "kn", jnp.float32)
    with pytest.raises(ValueError, match="w_layout"):
        native.matmul(x, w, w_layout="mk")
    with pytest.raises(ValueError, match="w"):
        native.matmul(x, w.T)  # [N, K] given as "kn"
    with pytest.raises(ValueError, match="w"):
        native.matmul(x, w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="x"):
        native.matmul(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="w"):
        native.matmul(x, w[None])


# out_dtype=float32 for bf16 operands: (M, K, N) over the nk dot-product path (M < 16),
# the packed nk path, the unpacked and packed kn paths (M 256 / K 1024) and tails.
F32_OUT_SHAPES = [(1, 512, 512), (3, 17, 33), (16, 130, 70), (65, 513, 100),
                  (261, 35, 150), (40, 1025, 70)]


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("m,k,n", F32_OUT_SHAPES)
def test_bf16_float32_out(m, k, n, layout, march):
    x, w = inputs(m, k, n, layout, jnp.bfloat16, seed=3)
    y = jax.jit(lambda a, b: native.matmul(a, b, w_layout=layout, out_dtype=jnp.float32,
                                          march=march))(x, w)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    check(y, x, w, layout)  # float32 tolerance: not rounded to bf16
    # the same sums as the bf16 result, before its one rounding
    y16 = native.matmul(x, w, w_layout=layout, march=march)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)),
                                  np.asarray(y16.astype(jnp.float32)))


def test_out_dtype_same_as_x():
    x, w = inputs(4, 8, 12, "kn", jnp.float32)
    assert native.matmul(x, w, out_dtype=jnp.float32).dtype == jnp.float32
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert native.matmul(xb, wb, out_dtype=jnp.bfloat16).dtype == jnp.bfloat16


# gated MLP (M, K, F): M over 1, row tails and bf16's packing threshold (M 256, or K 1024
# with M 32); F over partial 32-column panels (<= 16, 17-31); K odd, 1 and long.
GATED_SHAPES = [(1, 512, 1536), (64, 512, 1536), (7, 33, 45), (13, 1, 20), (65, 513, 100),
                (261, 35, 150), (40, 1025, 70), (6, 96, 16), (2, 47, 8)]


def gated_inputs(m, k, f, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
    # gate pre-activations spread over silu's range (|g| ~ 3 for K = 512, some beyond 10)
    w_gate = jnp.asarray(rng.standard_normal((k, f)) * 3.0 / np.sqrt(k), dtype)  # [K, F]
    w_up = jnp.asarray(rng.standard_normal((k, f)), dtype)  # [K, F]
    return x, w_gate, w_up


def check_gated(y, x, w_gate, w_up):
    g, g_scale = reference(x, w_gate, "kn")  # [M, F]
    u, u_scale = reference(x, w_up, "kn")
    with np.errstate(over="ignore"):  # exp(-g) = inf: silu(g) = -0
        silu = g / (1.0 + np.exp(-g))
    ref = silu * u
    got = np.asarray(y.astype(jnp.float32), np.float64)
    assert got.shape == ref.shape
    g_err, u_err = 1e-5 * g_scale, 1e-5 * u_scale  # float32 accumulation of each product
    # |silu'| <= 1.1; the float32 epilogue (exp, divide, multiply) ~1e-6 relative
    tol = 1.1 * g_err * (np.abs(u) + u_err) + np.abs(silu) * u_err + 1e-6 * np.abs(ref) + 1e-30
    if y.dtype == jnp.bfloat16:
        tol = tol + 2.0 ** -8 * np.abs(ref)  # one rounding to bf16
    err = np.abs(got - ref)
    assert np.all(err <= tol), f"max error {err.max()} where tol {tol[np.argmax(err - tol)]}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k,f", GATED_SHAPES)
def test_gated_mlp_matches_numpy(m, k, f, dtype, march):
    x, w_gate, w_up = gated_inputs(m, k, f, dtype)
    y = jax.jit(native.gated_mlp, static_argnames="march")(x, w_gate, w_up, march=march)
    assert y.dtype == dtype and y.shape == (m, f)
    check_gated(y, x, w_gate, w_up)


def test_gated_mlp_batch_dims_and_extremes(march):
    x, w_gate, w_up = gated_inputs(2 * 35, 72, 90, jnp.float32, seed=1)
    x = x.at[0].multiply(1e3)  # gate sums far beyond exp's range: silu(g) -> 0 or g
    y3 = native.gated_mlp(x.reshape(2, 35, 72), w_gate, w_up, march=march)  # [B, T, F]
    assert y3.shape == (2, 35, 90) and np.all(np.isfinite(np.asarray(y3)))
    check_gated(y3.reshape(70, 90), x, w_gate, w_up)


def test_gated_mlp_bad_arguments():
    x, w_gate, w_up = gated_inputs(4, 8, 12, jnp.float32)
    with pytest.raises(ValueError, match="x"):
        native.gated_mlp(x.astype(jnp.int32), w_gate, w_up)
    with pytest.raises(ValueError, match="w_gate"):
        native.gated_mlp(x, w_gate.T, w_up)
    with pytest.raises(ValueError, match="w_gate"):
        native.gated_mlp(x, w_gate.astype(jnp.bfloat16), w_up)
    with pytest.raises(ValueError, match="w_up"):
        native.gated_mlp(x, w_gate, w_up[:, :6])
    with pytest.raises(ValueError, match="w_up"):
        native.gated_mlp(x, w_gate, w_up[None])
    with pytest.raises(ValueError, match="out_dtype"):
        native.matmul(x, w_gate, out_dtype=jnp.bfloat16)  # f32 operands, bf16 result


# -- rows: only the real (unpadded) leading rows are computed --------------------------
ROWS = [0, 1, 37, 63, 64, 1000, -5]  # of M = 64: none, one, a tail, all, past M, negative


def _rows_check(full, got, rows, exact=False):
    """The first `rows` rows as without `rows` (the kernel may pick another blocking for
    fewer rows, so float sums can differ in the last bits), zeros below."""
    valid = min(max(rows, 0), full.shape[0])
    got, full = np.asarray(got.astype(jnp.float32)), np.asarray(full.astype(jnp.float32))
    if exact:
        np.testing.assert_array_equal(got[:valid], full[:valid])
    else:
        np.testing.assert_allclose(got[:valid], full[:valid], rtol=2.0 ** -7, atol=1e-4)
    assert not got[valid:].any(), "rows past `rows` must be zeros"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_rows_computes_the_leading_rows_and_zeros_the_rest(layout, dtype, march):
    # M = 64 with a row count known only at run time (traced), as in the engine's steps
    x, w = inputs(64, 96, 200, layout, dtype, seed=3)
    run = jax.jit(lambda x, w, r: native.matmul(x, w, w_layout=layout, rows=r, march=march))
    full = native.matmul(x, w, w_layout=layout, march=march)
    for rows in ROWS:
        _rows_check(full, run(x, w, jnp.int32(rows)), rows)
    if dtype == jnp.bfloat16:  # the float32-output variant too
        full = native.matmul(x, w, w_layout=layout, out_dtype=jnp.float32, march=march)
        _rows_check(full, native.matmul(x, w, w_layout=layout, out_dtype=jnp.float32,
                                        rows=10, march=march), 10)
    # batch dims are flattened: rows counts rows of [..., K] in row-major order
    x3 = x.reshape(4, 16, 96)
    got = native.matmul(x3, w, w_layout=layout, rows=20, march=march).reshape(64, 200)
    if dtype == jnp.bfloat16:
        full = native.matmul(x, w, w_layout=layout, march=march)
    _rows_check(full, got, 20)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rows_for_the_gated_mlp_and_the_lm_head_argmax(dtype, march):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((64, 128)), dtype)  # [M, K]
    wg, wu = (jnp.asarray(rng.standard_normal((128, 96)), dtype) for _ in range(2))
    e = jnp.asarray(rng.standard_normal((300, 128)), dtype)  # [V, D]
    gated = jax.jit(lambda x, r: native.gated_mlp(x, wg, wu, rows=r, march=march))
    head = jax.jit(lambda x, r: native.lm_head_argmax(x, e, rows=r, march=march))
    head_kn = jax.jit(lambda x, r: native.lm_head_argmax(x, e.T, w_layout="kn", rows=r,
                                                         march=march))
    full_gated = native.gated_mlp(x, wg, wu, march=march)
    full_idx = native.lm_head_argmax(x, e, march=march)
    for rows in ROWS:
        _rows_check(full_gated, gated(x, jnp.int32(rows)), rows)
        _rows_check(full_idx, head(x, jnp.int32(rows)), rows, exact=True)
        _rows_check(full_idx, head_kn(x, jnp.int32(rows)), rows, exact=True)


def test_rows_must_be_one_integer():
    x, w = inputs(8, 16, 16, "kn", jnp.float32)
    with pytest.raises(ValueError, match="rows must be one integer"):
        native.matmul(x, w, rows=jnp.float32(3))
    with pytest.raises(ValueError, match="rows must be one integer"):
        native.gated_mlp(x, w, w, rows=np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="rows must be one integer"):
        native.lm_head_argmax(x, w, rows=2.5)
