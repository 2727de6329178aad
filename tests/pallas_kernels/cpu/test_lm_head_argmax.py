"""The native fused LM head + argmax (`lm_head_argmax`) against float64 numpy: both weight
layouts, float32 and bfloat16, the packing thresholds, ties, NaNs, batch dims, and the
packed token mask of structured outputs."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.testing.native_kernels import kernel_marches, needs_compiler
from pallas_kernels.cpu import matmul as native

pytestmark = needs_compiler


# Once per build target this CPU can execute; the portable build (no SIMD microkernels) is
# slow here: the engine keeps XLA's dot where the GEMM is not vectorized.
@pytest.fixture(params=[pytest.param(m, marks=() if native.vectorized(m) else pytest.mark.slow)
                        for m in kernel_marches()])
def march(request) -> str:
    return request.param


# lm_head_argmax: (B, D, V) over B = 1, the nk packing thresholds (16 bf16 / 64 f32), row
# tails and B = 256; V off 16 and 64 (1000, 32003), D odd (bf16 K-pair tail) and short;
# the kn packing thresholds (bf16: B >= 256, or D >= 1024 and B >= 32; f32: B >= 256 and
# D >= 1024; f32 D > 512 in K blocks) and B past one row chunk (264).
# The two large-vocabulary shapes at B = 64 and 256 are slow (seconds for the float64
# reference alone); B = 64 and 270 at V = 1000, and V = 32003 at B = 17, keep those paths.
ARGMAX_SHAPES = [(1, 512, 32000), (3, 33, 1000), (16, 512, 1000), (17, 64, 32003),
                 pytest.param(64, 512, 32000, marks=pytest.mark.slow), (65, 129, 1000),
                 pytest.param(256, 512, 32003, marks=pytest.mark.slow), (7, 1, 1000),
                 (64, 1031, 1000), (270, 1024, 1000)]


def argmax_w(e, layout):
    """The lm_head_argmax weight for embedding e [V, D]: e ("nk"), or e.T materialized
    [D, V] ("kn")."""
    return e if layout == "nk" else jnp.asarray(np.ascontiguousarray(np.asarray(e).T))


_argmax_jit = jax.jit(native.lm_head_argmax, static_argnames=("w_layout", "march"))
LAYOUTS = pytest.mark.parametrize("layout", ["nk", "kn"])


def argmax_reference(h, e):
    """float64 logits' argmax on exactly the (possibly bf16-rounded) inputs, and a mask of
    the rows whose top two logits differ by more than float32 accumulation's rounding."""
    h64 = np.asarray(h.astype(jnp.float32), np.float64)  # [B, D]
    e64 = np.asarray(e.astype(jnp.float32), np.float64)  # [V, D]
    logits = h64 @ e64.T  # [B, V]
    tol = 1e-5 * (np.abs(h64) @ np.abs(e64).T)  # [B, V]
    idx = np.argmax(logits, axis=-1)
    rows = np.arange(len(idx))
    top = logits[rows, idx]
    others = logits.copy()
    others[rows, idx] = -np.inf
    clear = top - others.max(axis=-1) > 2 * tol.max(axis=-1) if logits.shape[1] > 1 \
        else np.ones(len(idx), bool)
    return idx, clear


@LAYOUTS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b,d,v", ARGMAX_SHAPES)
def test_lm_head_argmax_matches_numpy(b, d, v, dtype, layout, march):
    rng = np.random.default_rng(b * 7 + v)
    h = jnp.asarray(rng.standard_normal((b, d)), dtype)  # [B, D]
    e = jnp.asarray(rng.standard_normal((v, d)), dtype)  # [V, D]
    got = _argmax_jit(h, argmax_w(e, layout), w_layout=layout, march=march)
    assert got.dtype == jnp.int32 and got.shape == (b,)
    ref, clear = argmax_reference(h, e)
    assert clear.mean() >= 0.75, "too many near-ties: pick other inputs"
    np.testing.assert_array_equal(np.asarray(got)[clear], ref[clear])


@LAYOUTS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b", [1, 8, 64])
def test_lm_head_argmax_ties_take_the_first(b, dtype, layout, march):
    v, d = 32003, 96
    rng = np.random.default_rng(3)
    h = rng.standard_normal((b, d)).astype(np.float32)  # [B, D]
    e = rng.standard_normal((v, d)).astype(np.float32)  # [V, D]
    # Row r's maximum is planted at two or three duplicate embedding rows: within a 64-row
    # panel, across panels and blocks, and at the vocabulary's (partial) last panel.
    firsts = []
    for r in range(b):
        first = (r * 997 + 5) % (v - 100)
        dups = [first, first + 1 + r % 40, v - 1 - r % 3][: 2 + r % 2]
        dups = sorted(set(dups))
        planted = 20.0 * h[r] / np.linalg.norm(h[r]) * np.sqrt(d)
        for j in dups:
            e[j] = planted
        firsts.append(dups[0])
    h, e = jnp.asarray(h, dtype), jnp.asarray(e, dtype)
    got = np.asarray(_argmax_jit(h, argmax_w(e, layout), w_layout=layout, march=march))
    ref, clear = argmax_reference(h, e)
    np.testing.assert_array_equal(got, np.asarray(firsts))
    np.testing.assert_array_equal(ref, np.asarray(firsts))  # numpy agrees: first of ties
    # All logits equal (a zero embedding): index 0, as jnp.argmax.
    zero = native.lm_head_argmax(h, argmax_w(jnp.zeros((v, d), dtype), layout),
                                 w_layout=layout, march=march)
    np.testing.assert_array_equal(np.asarray(zero), np.zeros(b, np.int32))


@LAYOUTS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b", [2, 64])
def test_lm_head_argmax_nan_takes_the_first_nan(b, dtype, layout, march):
    v, d = 1000, 64
    rng = np.random.default_rng(4)
    h = rng.standard_normal((b, d)).astype(np.float32)  # [B, D]
    e = rng.standard_normal((v, d)).astype(np.float32)  # [V, D]
    e[: 50] *= 10.0  # large logits before the NaNs: the NaN still wins
    e[613, 5] = np.nan  # logit 613 is NaN in every row: the answer, but for rows 0 and 1
    e[170, 0] = np.inf  # +-inf logits before it (h is nonzero there): the NaN still wins
    h[0] = np.nan  # row 0: every logit NaN -> 0
    h[1, 3] = 0.0
    e[90, :] = 0.0
    e[90, 3] = np.inf  # logit 90: +-inf, but 0 * inf = NaN in row 1 -> 90
    h, e = jnp.asarray(h, dtype), jnp.asarray(e, dtype)
    got = np.asarray(_argmax_jit(h, argmax_w(e, layout), w_layout=layout, march=march))
    logits = jnp.dot(h.astype(jnp.float32), e.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)  # [B, V]
    want = np.asarray(jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(want, [0, 90] + [613] * (b - 2))
    np.testing.assert_array_equal(got, want)


@LAYOUTS
def test_lm_head_argmax_batch_dims_and_bad_arguments(layout, march):
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)  # [B, T, D]
    e = jnp.asarray(rng.standard_normal((300, 40)), jnp.float32)  # [V, D]
    w = argmax_w(e, layout)
    got = native.lm_head_argmax(h, w, w_layout=layout, march=march)
    assert got.shape == (2, 3) and got.dtype == jnp.int32
    ref, clear = argmax_reference(h.reshape(6, 40), e)
    np.testing.assert_array_equal(np.asarray(got).reshape(6)[clear], ref[clear])
    other = "kn" if layout == "nk" else "nk"
    with pytest.raises(ValueError, match="does not match h's last dimension"):
        native.lm_head_argmax(h, w, w_layout=other)  # the other layout's shape
    with pytest.raises(ValueError, match="^w must have h's dtype"):
        native.lm_head_argmax(h, w.astype(jnp.bfloat16), w_layout=layout)
    with pytest.raises(ValueError, match="^w must be 2-D"):
        native.lm_head_argmax(h, w[None], w_layout=layout)
    with pytest.raises(ValueError, match="^h must"):
        native.lm_head_argmax(h.astype(jnp.int32), w, w_layout=layout)
    with pytest.raises(ValueError, match="w_layout"):
        native.lm_head_argmax(h, w, w_layout="tn")


def _random_bitmask(rng, b, v, density):
    """[B, ceil(V/32)] int32 rows of allowed ids, and the [B, V] bool they pack."""
    from jaxserve.runner.token_bitmask import pack_token_bitmask

    allowed = rng.random((b, v)) < density  # [B, V]
    allowed[0] = True  # a row with every id allowed (all-ones words)
    if b > 2:
        allowed[1] = False
        allowed[1, v - 1] = True  # only the last id, in the last partial panel
        allowed[2] = False  # nothing allowed: every logit -inf, index 0 as jnp.argmax
    return pack_token_bitmask(allowed), allowed


@LAYOUTS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b,d,v", [(1, 64, 1000), (17, 64, 32003), (70, 129, 1000)])
def test_lm_head_argmax_with_a_bitmask_takes_the_allowed_maximum(b, d, v, dtype, layout,
                                                                  march):
    """A structured-output mask: ids whose bit is clear count as -inf, as
    `sampler.apply_token_bitmask` makes them, NaNs among them included."""
    rng = np.random.default_rng(b + v)
    h = rng.standard_normal((b, d)).astype(np.float32)  # [B, D]
    e = rng.standard_normal((v, d)).astype(np.float32)  # [V, D]
    e[7, 0] = np.nan  # logit 7 is NaN in every row: it wins only where 7 is allowed
    bitmask, allowed = _random_bitmask(rng, b, v, density=0.05)
    if b > 3:
        allowed[3, 7] = False  # row 3 must not see the NaN
        allowed[4, 7] = True  # row 4 must
        from jaxserve.runner.token_bitmask import pack_token_bitmask

        bitmask = pack_token_bitmask(allowed)
    h, e = jnp.asarray(h, dtype), jnp.asarray(e, dtype)
    got = np.asarray(_argmax_jit(h, argmax_w(e, layout), w_layout=layout, march=march,
                                 bitmask=jnp.asarray(bitmask)))
    logits = np.asarray(h.astype(jnp.float32), np.float64) @ np.asarray(
        e.astype(jnp.float32), np.float64).T  # [B, V]
    masked = np.where(allowed, logits, -np.inf)
    want = np.asarray(jnp.argmax(jnp.asarray(masked), axis=-1))  # NaN first, then maximum
    top = np.sort(np.where(np.isnan(masked), -np.inf, masked), axis=-1)
    with np.errstate(invalid="ignore"):  # -inf - -inf where a row allows one id or none
        gap = top[:, -1] - top[:, -2]
    clear = (gap > 1e-3) | ~np.isfinite(top[:, -2]) | np.isnan(masked).any(axis=-1)
    assert clear.mean() >= 0.75
    np.testing.assert_array_equal(got[clear], want[clear])
    assert got[0] == want[0] == (7 if allowed[0, 7] else want[0])
    if b > 3:
        assert (got[1], got[2], got[4]) == (v - 1, 0, 7) and got[3] != 7
    with pytest.raises(ValueError, match="bitmask must be"):
        native.lm_head_argmax(h, argmax_w(e, layout), w_layout=layout,
                              bitmask=jnp.asarray(bitmask)[:, :-(-v // 32) - 1])
