"""Building blocks of decoder-only models: RMSNorm, rotary embeddings, embedding, Linear, MLP.

Every parameter is an `nnx.Param` that declares, as metadata, its HF checkpoint name
(`hf_name`), whether the checkpoint stores it transposed (`hf_transpose`, true for Linear
weights, which torch keeps as [out, in]) and its logical axes (`axes`, for the sharding
rules). The loader reads only this metadata; models never touch checkpoints themselves.
Every dense product goes through `dense_dot`, which picks XLA's dot or the native CPU GEMM.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _native_gemm(x, w, preferred_element_type) -> bool:
    """Whether `dense_dot` runs on the native CPU GEMM (pallas_kernels/cpu/matmul.cc).

    On the CPU platform, when it builds here, outside tensor parallelism (its custom call
    has no sharding rule), for float32 or bfloat16 operands of one dtype and a result in
    that dtype or float32. JAXSERVE_CPU_GEMM=xla keeps XLA's dot (for comparisons).
    """
    from jaxserve.parallel.tensor_parallel import model_axis_size

    dtype = jnp.dtype(x.dtype)
    return (dtype == jnp.dtype(w.dtype) and dtype in (jnp.float32, jnp.bfloat16)
            and preferred_element_type in (None, dtype, jnp.float32)
            and model_axis_size() == 1 and native_cpu_gemm_enabled())


def _native_rope(x) -> bool:
    """Whether Rotary runs on the native CPU kernel: as `_native_gemm` decides for dots."""
    from jaxserve.parallel.tensor_parallel import model_axis_size
    from pallas_kernels.cpu import rope

    return (jnp.dtype(x.dtype) in (jnp.float32, jnp.bfloat16) and x.ndim == 3
            and model_axis_size() == 1 and native_cpu_gemm_enabled() and rope.available())


def native_cpu_gemm_enabled() -> bool:
    """CPU platform, the kernel builds here with SIMD microkernels (AVX2 or AVX-512: the
    portable loops are slower than XLA's dot), and JAXSERVE_CPU_GEMM is not "xla"."""
    from pallas_kernels.cpu import matmul

    return (os.environ.get("JAXSERVE_CPU_GEMM", "native") != "xla"
            and jax.default_backend() == "cpu" and matmul.vectorized()
            and matmul.available())


def dense_dot(x,  # [..., K]
              w,  # [K, N] ("kn", a Linear kernel) or [N, K] ("nk", a tied embedding)
              *, w_layout: str = "kn", preferred_element_type=None,
              rows=None):  # -> [..., N]
    """x @ w (or x @ w.T for "nk"): XLA's dot, or the native CPU GEMM (`_native_gemm`).

    The native GEMM accumulates in float32 and writes the operands' dtype, or float32 when
    `preferred_element_type` asks for it (bfloat16 logits are never rounded). `rows`, an
    int32 scalar, says that only the first `rows` rows of the flattened x are real (the
    step's tokens before bucket padding): the native GEMM computes those only and leaves
    zeros below; XLA's dot computes every row. None: all rows are real.
    """
    if _native_gemm(x, w, preferred_element_type):
        from pallas_kernels.cpu import matmul

        return matmul.matmul(x, w, w_layout=w_layout, out_dtype=preferred_element_type,
                             rows=rows)
    spec = "...k,kn->...n" if w_layout == "kn" else "...k,nk->...n"
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def tied_head_argmax(hidden,     # [B, D] final hidden states
                     embedding,  # [V, D] the tied embedding
                     head_kn=None,  # [D, V] its transposed copy (Embed.add_kn_head), or None
                     *, rows=None,  # int32 scalar: the real rows of hidden (see dense_dot)
                     ):  # -> [B] int32, or None where the native kernel does not apply
    """argmax(hidden @ embedding.T) per row in one native CPU call that never writes the
    [B, V] logits (greedy sampling's LM head); None where `dense_dot` would use XLA. With
    `head_kn` the kernel streams [D, V] panels as they are instead of transposing them.
    Rows past `rows` get token 0."""
    if not _native_gemm(hidden, embedding, None):
        return None
    from pallas_kernels.cpu import matmul

    if head_kn is not None:
        return matmul.lm_head_argmax(hidden, head_kn, w_layout="kn", rows=rows)
    return matmul.lm_head_argmax(hidden, embedding, rows=rows)


def hf_param(value: jax.Array, *, hf_name: str, axes: tuple[str | None, ...],
             hf_transpose: bool = False) -> nnx.Param:
    """A parameter that knows where the checkpoint keeps it and how it is sharded."""
    if len(axes) != value.ndim:
        raise ValueError(f"{hf_name}: axes {axes} do not match shape {value.shape}")
    return nnx.Param(value, hf_name=hf_name, hf_transpose=hf_transpose, axes=axes)


def init_normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype) -> jax.Array:
    """A weight's initial value: N(0, 0.02) from `rngs`, or zeros when `rngs` is None.

    `build_model(abstract=True)` passes None: it keeps only shapes and dtypes, and zeros
    trace as one op where the threefry normal traces dozens per weight (a 30-layer model's
    abstract build fell from ~1.3 s to ~0.2 s)."""
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32 like HF (then cast back before the scale)."""

    def __init__(self, dim: int, *, eps: float, hf_name: str, axis: str = "norm", dtype=jnp.float32):
        self.weight = hf_param(jnp.ones((dim,), dtype), hf_name=hf_name, axes=(axis,))  # [dim]
        self.eps = eps

    def __call__(self, x):  # [..., dim]
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding; `attend` reuses it as the LM head when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int, *, hf_name: str, dtype, rngs: nnx.Rngs):
        self.embedding = hf_param(init_normal(rngs, (vocab_size, dim), dtype), hf_name=hf_name,
                                  axes=("vocab", "embed"))  # [V, D]
        self.head_kn = None  # [D, V] transposed copy for the native CPU greedy head, or None

    def add_kn_head(self) -> None:
        """Keeps `head_kn`, a contiguous [D, V] transpose of the embedding, for the native
        CPU greedy head (`tied_head_argmax`); costs V * D more elements of memory."""
        self.head_kn = nnx.data(nnx.Variable(jnp.transpose(self.embedding[...])))  # new [D, V]

    def __call__(self, input_ids):  # [T] int32 -> [T, D]
        return jnp.take(self.embedding[...], input_ids, axis=0)

    def attend(self, hidden, *, rows=None):  # [..., D] -> [..., V] float32
        return dense_dot(hidden, self.embedding[...], w_layout="nk",
                         preferred_element_type=jnp.float32, rows=rows)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); the kernel is [in, out], the checkpoint's weight its transpose."""

    def __init__(self, in_features: int, out_features: int, *, hf_name: str,
                 axes: tuple[str | None, str | None], use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = hf_param(init_normal(rngs, (in_features, out_features), dtype),
                               hf_name=f"{hf_name}.weight", axes=axes, hf_transpose=True)  # [in, out]
        self.bias = (hf_param(jnp.zeros((out_features,), dtype), hf_name=f"{hf_name}.bias",
                              axes=(axes[1],)) if use_bias else None)  # [out]

    def __call__(self, x, *, preferred_element_type=None,
                 rows=None):  # [..., in] -> [..., out]; rows: see dense_dot
        y = dense_dot(x, self.kernel[...], preferred_element_type=preferred_element_type,
                      rows=rows)
        return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
    """Gated SiLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, width: int, *, hf_name: str, use_bias: bool, dtype,
                 rngs: nnx.Rngs):
        up = dict(axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(dim, width, hf_name=f"{hf_name}.gate_proj", **up)
        self.up_proj = Linear(dim, width, hf_name=f"{hf_name}.up_proj", **up)
        self.down_proj = Linear(width, dim, hf_name=f"{hf_name}.down_proj", axes=("mlp", "embed"),
                                use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, rows=None):  # [T, D] -> [T, D]; rows: see dense_dot
        gate, up = self.gate_proj, self.up_proj
        if gate.bias is None and _native_gemm(x, gate.kernel[...], None):
            from pallas_kernels.cpu import matmul

            # one native call computes silu(x @ gate) * (x @ up) with a float32 epilogue
            hidden = matmul.gated_mlp(x, gate.kernel[...], up.kernel[...], rows=rows)  # [T, F]
        else:
            hidden = jax.nn.silu(gate(x, rows=rows)) * up(x, rows=rows)  # [T, F]
        return self.down_proj(hidden, rows=rows)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """Rotary position embedding with the HF scaling variants; pairs (i, i + H/2) rotate
    (HF's rotate-half layout), or (2i, 2i + 1) when `interleaved` (DeepSeek-V2's complex form)."""

    head_dim: int  # H: pair i of a head rotates by position * inv_freq[i]
    theta: float  # base wavelength
    # sorted (key, value) items of the normalized rope_scaling dict; None for plain RoPE
    scaling: tuple[tuple[str, object], ...] | None = None
    interleaved: bool = False

    def __call__(self, x, positions):  # [T, n, H], [T] int32 -> [T, n, H]
        inv_freq, attention_factor = rope_frequencies(self.head_dim, self.theta, self.scaling)
        angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [T, H/2]
        cos = (jnp.cos(angles) * attention_factor)[:, None, :]  # [T, 1, H/2]
        sin = (jnp.sin(angles) * attention_factor)[:, None, :]
        xf = x.astype(jnp.float32)
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [T, n, H/2] each
            out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [T, n, H/2, 2]
            return out.reshape(x.shape).astype(x.dtype)
        if _native_rope(x):  # XLA:CPU runs the concatenation below one element at a time
            from pallas_kernels.cpu import rope

            return rope.rope(x, cos[:, 0], sin[:, 0])
        x1, x2 = jnp.split(xf, 2, axis=-1)  # [T, n, H/2] each
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: tuple[tuple[str, object], ...] | None
                     ) -> tuple[np.ndarray, float]:
    """(inv_freq [H/2] float32, attention factor), computed as transformers does in float32."""
    params = dict(scaling or ())
    rope_type = params.get("rope_type", "default")
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)  # [H/2]
    pos_freqs = f32(theta) ** exponents
    inv_freq = f32(1.0) / pos_freqs
    if rope_type == "default":
        return inv_freq, 1.0
    factor = f32(params["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    original = params["original_max_position_embeddings"]
    if rope_type == "llama3":
        low, high = f32(params["low_freq_factor"]), f32(params["high_freq_factor"])
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (f32(original) / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, float(theta), float(factor), original, pos_freqs, params)
    raise ValueError(f"rope_type {rope_type!r} is not supported")


def _yarn(head_dim: int, theta: float, factor: float, original: int, pos_freqs: np.ndarray,
          params: dict) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)  # 1: keep the original frequency
    inv_freq = (np.float32(1.0) / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) \
        + (np.float32(1.0) / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)
