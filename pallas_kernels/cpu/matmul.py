"""A native CPU GEMM, y = x @ W, as XLA FFI handlers (matmul.cc) for the small-M dots of decoding.

float32 or bfloat16 (vdpbf16ps with AVX512_BF16, else widened to float32 on load), with
float32 accumulation, for AVX-512, AVX2 + FMA or plain x86-64; W is "kn" ([K, N],
a Linear kernel) or "nk" ([N, K], a tied LM head: logits = h @ E^T); bfloat16 products can
return float32 (`out_dtype`, e.g. for logits). `gated_mlp` fuses a gated MLP's
up-projection, silu(x @ w_gate) * (x @ w_up), into one pass. `available()` says whether
the kernel builds here; callers fall back to jnp when it does not.
`lm_head_argmax` fuses a tied LM head with greedy sampling: argmax(h @ E^T) per row, the
[B, V] logits never written; E is [V, D] ("nk") or pre-transposed [D, V] ("kn").
Each takes `march`, the build target (see `build.resolve_march`), and `rows`, an int32
scalar (traced or not): only the first `rows` rows of the flattened x are computed and the
rest of the result is zeros, so that a step padded to its bucket pays for its real tokens
only (None: all rows).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import build

_TARGETS = ("matmul_f32_kn", "matmul_f32_nk", "matmul_bf16_kn", "matmul_bf16_nk",
            "matmul_bf16_kn_outf32", "matmul_bf16_nk_outf32", "gated_mlp_f32", "gated_mlp_bf16",
            "lm_head_argmax_f32", "lm_head_argmax_bf16", "lm_head_argmax_kn_f32",
            "lm_head_argmax_kn_bf16")
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}


def available(march: str | None = None) -> bool:
    """Whether matmul.cc builds and registers with XLA here for `march` (see
    `build.resolve_march`: default $JAXSERVE_CPU_MARCH, else native)."""
    return build.available("matmul", _TARGETS, march)


def vectorized(march: str | None = None) -> bool:
    """Whether the build for `march` has SIMD microkernels (AVX2 + FMA, or AVX-512). Without
    them (x86-64-v2, other architectures) the portable loops run ~6x slower than XLA's dot,
    so callers should keep XLA's."""
    try:
        return {"__AVX2__", "__FMA__"} <= build.code_path(march)
    except build.NativeKernelUnavailable:
        return False


def _rows_operand(rows, m: int) -> jax.Array:  # -> [1] int32
    """The kernels' `rows` operand: how many leading rows of the [M, K] operand to compute
    (clamped to [0, M] by the kernel); None: all M."""
    if rows is None:
        return jnp.full((1,), m, jnp.int32)
    rows = jnp.asarray(rows)
    if rows.size != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"rows must be one integer (a scalar), got shape {rows.shape} "
                         f"dtype {rows.dtype}")
    return rows.reshape(1).astype(jnp.int32)


def _check_x(x: jax.Array, name: str = "x") -> None:
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension [..., K], got shape "
                         f"{x.shape}")
    if jnp.dtype(x.dtype) not in _DTYPE_NAMES:
        raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")


def matmul(x: jax.Array,  # [..., K]
           w: jax.Array,  # [K, N] ("kn") or [N, K] ("nk")
           *, w_layout: str = "kn", out_dtype=None, rows=None,
           march: str | None = None) -> jax.Array:  # [..., N]
    """x @ w ("kn") or x @ w.T ("nk") with float32 accumulation, on the native CPU kernel.

    x and w must both be float32 or both bfloat16. The result has their dtype, or
    `out_dtype`: None or x's dtype, or float32 for bfloat16 operands (the float32 sums,
    never rounded to bfloat16). Leading batch dims of x are flattened into M; only the
    first `rows` of those M rows are computed (the others are zeros; None: all). Raises
    NativeKernelUnavailable if the kernel cannot be built here (check `available()` first).
    """
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"w_layout must be 'kn' or 'nk', got {w_layout!r}")
    _check_x(x)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D ([K, N] or [N, K]), got shape {w.shape}")
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
        raise ValueError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    out = jnp.dtype(x.dtype) if out_dtype is None else jnp.dtype(out_dtype)
    if out not in (jnp.dtype(x.dtype), jnp.dtype(jnp.float32)):
        raise ValueError(f"out_dtype must be None, x's dtype {x.dtype} or float32, "
                         f"got {out_dtype}")
    k = x.shape[-1]
    n, w_k = (w.shape[1], w.shape[0]) if w_layout == "kn" else w.shape
    if w_k != k:
        raise ValueError(f"w of shape {w.shape} (layout {w_layout!r}) does not match x's "
                         f"last dimension K={k}")
    batch = x.shape[:-1]
    m = 1
    for d in batch:
        m *= d
    target = f"matmul_{_DTYPE_NAMES[jnp.dtype(x.dtype)]}_{w_layout}"
    if out != jnp.dtype(x.dtype):
        target += "_outf32"
    x2 = x.reshape(m, k)  # [M, K]
    y = jax.ffi.ffi_call(build.ffi_target("matmul", _TARGETS, target, march),
                         jax.ShapeDtypeStruct((m, n), out))(x2, w, _rows_operand(rows, m))
    return y.reshape(*batch, n)


def gated_mlp(x: jax.Array,  # [..., K]
              w_gate: jax.Array,  # [K, F]
              w_up: jax.Array,  # [K, F]
              *, rows=None, march: str | None = None) -> jax.Array:  # [..., F]
    """silu(x @ w_gate) * (x @ w_up), a gated MLP's up-projection, on the native CPU kernel.

    Both products for the same output columns are computed in one tile loop with float32
    accumulators and the silu-multiply epilogue in float32 (silu(g) = g / (1 + exp(-g))),
    then rounded once to x's dtype: the [..., F] intermediates are never written. x,
    w_gate and w_up must all be float32 or all bfloat16; both weights are "kn" ([K, F]).
    Leading batch dims of x are flattened into M; only the first `rows` are computed (the
    others are zeros; None: all). Raises NativeKernelUnavailable if the kernel cannot be
    built here (check `available()` first).
    """
    _check_x(x)
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        if w.ndim != 2:
            raise ValueError(f"{name} must be 2-D [K, F], got shape {w.shape}")
        if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {w.dtype}")
    k = x.shape[-1]
    if w_gate.shape[0] != k:
        raise ValueError(f"w_gate of shape {w_gate.shape} does not match x's last dimension "
                         f"K={k} (it must be [K, F])")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have w_gate's shape {w_gate.shape}, got {w_up.shape}")
    f = w_gate.shape[1]
    batch = x.shape[:-1]
    m = 1
    for d in batch:
        m *= d
    target = build.ffi_target("matmul", _TARGETS,
                              f"gated_mlp_{_DTYPE_NAMES[jnp.dtype(x.dtype)]}", march)
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, f), x.dtype))(
        x.reshape(m, k), w_gate, w_up, _rows_operand(rows, m))  # [M, F]
    return y.reshape(*batch, f)


def lm_head_argmax(h: jax.Array,  # [B, D]
                   w: jax.Array,  # [V, D] ("nk", the embedding) or [D, V] ("kn", its transpose)
                   *, w_layout: str = "nk", rows=None,
                   bitmask: jax.Array | None = None,  # [B, W] int32 packed allowed ids
                   march: str | None = None) -> jax.Array:  # [B] int32
    """argmax(h @ E.T, axis=-1) per row, on the native CPU kernel, never writing logits.

    E is the tied embedding [V, D]: `w` is E itself (w_layout="nk") or E.T materialized as
    [D, V] (w_layout="kn"; the kn microkernels then read it in place, with the kn matmul's
    weight prefetch, instead of transposing panels of E on every call).
    Equal to `jnp.argmax(h.astype(f32) @ E.astype(f32).T, axis=-1)` with the logits
    accumulated in float32 (the order of the sums may differ from XLA's, so near-ties may
    resolve differently within float32 rounding): the first index of the maximum on ties,
    the first NaN's index where a row has NaN. h and w must both be float32 or both
    bfloat16. Leading batch dims of h are kept ([..., D] -> [...]); only the first `rows`
    flattened rows are computed (the others are 0; None: all). `bitmask` (structured
    outputs): bit i of word w of a row allows id 32 w + i (W >= ceil(V / 32)); the others
    count as -inf, as `sampler.apply_token_bitmask` makes them. Raises
    NativeKernelUnavailable if the kernel cannot be built here (check `available()` first).
    """
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"w_layout must be 'kn' or 'nk', got {w_layout!r}")
    _check_x(h, "h")
    want = "[V, D]" if w_layout == "nk" else "[D, V]"
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D {want} (layout {w_layout!r}), got shape {w.shape}")
    if jnp.dtype(w.dtype) != jnp.dtype(h.dtype):
        raise ValueError(f"w must have h's dtype {h.dtype}, got {w.dtype}")
    v, d = w.shape if w_layout == "nk" else w.shape[::-1]
    if d != h.shape[-1]:
        raise ValueError(f"w of shape {w.shape} (layout {w_layout!r}) does not match h's last "
                         f"dimension D={h.shape[-1]} (it must be {want})")
    if not 1 <= v < 2**31:
        raise ValueError(f"the vocabulary size must be in [1, 2^31), got {v}")
    batch = h.shape[:-1]
    b = 1
    for n in batch:
        b *= n
    layout = "_kn" if w_layout == "kn" else ""
    target = build.ffi_target("matmul", _TARGETS,
                              f"lm_head_argmax{layout}_{_DTYPE_NAMES[jnp.dtype(h.dtype)]}", march)
    if bitmask is None:
        bitmask = jnp.zeros((b, 0), jnp.int32)  # [B, 0]: no mask
    elif bitmask.shape != (b, bitmask.shape[-1]) or bitmask.shape[-1] < -(-v // 32):
        raise ValueError(f"bitmask must be [{b}, W] with W >= {-(-v // 32)}, got "
                         f"{bitmask.shape}")
    idx = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((b,), jnp.int32))(
        h.reshape(b, d), w, _rows_operand(rows, b), bitmask.astype(jnp.int32))  # [B]
    return idx.reshape(batch)
