"""Building blocks of decoder-only models: RMSNorm, rotary embeddings, embedding, Linear, MLP.

Every parameter is an `nnx.Param` that declares, as metadata, its HF checkpoint name
(`hf_name`), whether the checkpoint stores it transposed (`hf_transpose`, true for Linear
weights, which torch keeps as [out, in]) and its logical axes (`axes`, for the sharding
rules). The loader reads only this metadata; models never touch checkpoints themselves.
Every product goes through the `ops.Ops` the layer was built with; layers that multiply
take the step's `AttentionMetadata`, whose real-token count the ops use to skip padding.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.ops import Ops
from jaxserve.model.quantization import QuantizedWeight


def hf_param(value: jax.Array, *, hf_name: str, axes: tuple[str | None, ...],
             hf_transpose: bool = False) -> nnx.Param:
    """A parameter that knows where the checkpoint keeps it and how it is sharded."""
    if len(axes) != value.ndim:
        raise ValueError(f"{hf_name}: axes {axes} do not match shape {value.shape}")
    return nnx.Param(value, hf_name=hf_name, hf_transpose=hf_transpose, axes=axes)


def init_normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype) -> jax.Array:
    """A weight's initial value: N(0, 0.02) from `rngs`, or zeros when `rngs` is None.

    `build_model(abstract=True)` passes None: it keeps only shapes and dtypes, and zeros
    trace as one op where the threefry normal traces dozens per weight."""
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
    """Token embedding; `attend` reuses it as the LM head when embeddings are tied.

    The loader may fill `embedding` with a [D, V] `QuantizedWeight` (a GGUF's quantized
    table kept as stored, `hf_quantized_head`): the lookup then dequantizes only the rows it
    gathers and the head runs the quantized GEMM."""

    def __init__(self, vocab_size: int, dim: int, *, hf_name: str, dtype, ops: Ops,
                 rngs: nnx.Rngs | None):
        self.embedding = hf_param(init_normal(rngs, (vocab_size, dim), dtype), hf_name=hf_name,
                                  axes=("vocab", "embed"))  # [V, D], or quantized [D, V]
        self.embedding.set_metadata(hf_quantized_head=True)
        # [D, V] contiguous transpose for the native greedy head, or None; the loader adds
        # it (`add_kn_head`) where that kernel runs.
        self.head_kn = None
        self.ops = ops

    @property
    def quantized(self) -> bool:
        return isinstance(self.embedding[...], QuantizedWeight)

    def add_kn_head(self) -> None:
        """Keeps `head_kn`, a contiguous [D, V] transpose of the embedding, which the native
        greedy head streams as it is (`Ops.lm_head_argmax`); costs V * D more elements."""
        self.head_kn = nnx.data(nnx.Variable(jnp.transpose(self.embedding[...])))  # new [D, V]

    def __call__(self, input_ids):  # [T] int32 -> [T, D]
        table = self.embedding[...]
        if isinstance(table, QuantizedWeight):
            return table.take_columns(input_ids)
        return jnp.take(table, input_ids, axis=0)

    def attend(self, hidden,  # [..., D]
               num_rows,  # [] int32 real rows of hidden, or None
               ):  # -> [..., V] float32
        return self.ops.dense(hidden, self.embedding[...], num_rows,
                              w_layout="kn" if self.quantized else "nk",
                              out_dtype=jnp.float32)

    def argmax(self, hidden,  # [B, D]
               num_rows,  # [] int32 real rows of hidden
               bitmask=None,  # [B, W] int32 packed allowed ids, or None: all
               ):  # -> [B] int32, or None where no fused kernel runs
        head_kn = None if self.head_kn is None else self.head_kn[...]
        return self.ops.lm_head_argmax(hidden, self.embedding[...], num_rows, head_kn,
                                       bitmask)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); the kernel is [in, out], the checkpoint's weight its transpose."""

    def __init__(self, in_features: int, out_features: int, *, hf_name: str,
                 axes: tuple[str | None, str | None], use_bias: bool, dtype, ops: Ops,
                 rngs: nnx.Rngs | None):
        self.kernel = hf_param(init_normal(rngs, (in_features, out_features), dtype),
                               hf_name=f"{hf_name}.weight", axes=axes, hf_transpose=True)  # [in, out]
        self.bias = (hf_param(jnp.zeros((out_features,), dtype), hf_name=f"{hf_name}.bias",
                              axes=(axes[1],)) if use_bias else None)  # [out]
        self.ops = ops

    def __call__(self, x,  # [T, in] this step's tokens
                 metadata: AttentionMetadata):  # -> [T, out]
        return self.apply(x, metadata.num_tokens())

    def apply(self, x,  # [..., in]
              num_rows,  # [] int32 real rows of the flattened x, or None: all
              *, out_dtype=None):  # -> [..., out]
        y = self.ops.dense(x, self.kernel[...], num_rows, out_dtype=out_dtype)
        return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
    """Gated SiLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, width: int, *, hf_name: str, use_bias: bool, dtype, ops: Ops,
                 rngs: nnx.Rngs | None):
        up = dict(axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype, ops=ops, rngs=rngs)
        self.gate_proj = Linear(dim, width, hf_name=f"{hf_name}.gate_proj", **up)
        self.up_proj = Linear(dim, width, hf_name=f"{hf_name}.up_proj", **up)
        self.down_proj = Linear(width, dim, hf_name=f"{hf_name}.down_proj", axes=("mlp", "embed"),
                                use_bias=use_bias, dtype=dtype, ops=ops, rngs=rngs)
        self.ops = ops

    def __call__(self, x,  # [T, D]
                 metadata: AttentionMetadata):  # -> [T, D]
        gate, up = self.gate_proj, self.up_proj
        bias = lambda linear: None if linear.bias is None else linear.bias[...]  # noqa: E731
        hidden = self.ops.gated_mlp(x, gate.kernel[...], up.kernel[...], metadata.num_tokens(),
                                    bias(gate), bias(up))  # [T, F]
        return self.down_proj(hidden, metadata)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """Rotary position embedding with the HF scaling variants; pairs (i, i + H/2) rotate
    (HF's rotate-half layout), or (2i, 2i + 1) when `interleaved` (DeepSeek-V2's complex form)."""

    head_dim: int  # H: pair i of a head rotates by position * inv_freq[i]
    theta: float  # base wavelength
    # sorted (key, value) items of the normalized rope_scaling dict; None for plain RoPE
    scaling: tuple[tuple[str, object], ...] | None = None
    interleaved: bool = False
    ops: Ops = Ops()  # the rotate-half rotation runs as `ops.rope`

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
        return self.ops.rope(x, cos[:, 0], sin[:, 0])


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
