"""The native CPU GEMM against a float64 numpy matmul: both layouts, float32 and bfloat16,
M, N and K off the SIMD widths (tails, odd K for the bf16 K-pairs), batch dims, jit."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import matmul as native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="the native matmul kernel does not build here")

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
def test_matches_numpy(m, k, n, layout, dtype):
    x, w = inputs(m, k, n, layout, dtype)
    y = native.matmul(x, w, w_layout=layout)
    assert y.dtype == dtype and y.shape == (m, n)
    check(y, x, w, layout)


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_jit_batch_dims(layout):
    x, w = inputs(2 * 35, 72, 90, layout, jnp.bfloat16, seed=1)
    x3 = x.reshape(2, 35, 72)  # [B, T, K]
    y3 = jax.jit(lambda a, b: native.matmul(a, b, w_layout=layout))(x3, w)  # [B, T, N]
    assert y3.shape == (2, 35, 90)
    check(y3.reshape(70, 90), x, w, layout)


def test_f32_bit_close_to_xla():
    x, w = inputs(64, 512, 640, "kn", jnp.float32, seed=2)
    np.testing.assert_allclose(np.asarray(native.matmul(x, w)),
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
