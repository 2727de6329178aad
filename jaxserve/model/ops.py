"""The kernels a model runs, chosen once: `Ops`.

Models never pick a kernel or read the environment. `select_ops` decides, from the engine's
attention backend, the platform and the tensor-parallel size, which implementation serves
each op; the model keeps the resulting frozen `Ops` from its build (it is static: part of
the graph definition, so a jitted step is traced for exactly one choice). The ops:

- `dense(x, w, num_rows)`: x @ w, XLA's dot or the native CPU GEMM;
- `gated_mlp(x, w_gate, w_up, num_rows)`: silu(x @ w_gate) * (x @ w_up), one native call;
  `w` of both may be a `QuantizedWeight` (quantization.py): the native quantized GEMM
  (float32 activations, dequantized in its micro-kernel), else XLA's dot over the weight
  dequantized inside the step (the device keeps the packed form);
- `rope(x, cos, sin)`: the rotate-half rotation, native on CPU;
- `lm_head_argmax(hidden, embedding, num_rows, head_kn)`: greedy tokens of a tied head
  without writing the logits (native CPU only; None elsewhere), a quantized head's by the
  quantized GEMM;
- `write_rows(pool, slots, rows)` / `write_kv(pools, ...)`: the KV scatter (an 8-bit
  pool's rows quantized on the way in);
- `attention(q, pools, metadata, ...)`: paged attention by the attention backend.

`num_rows` is the step's real-token count (`AttentionMetadata.num_tokens()`; the sequence
count at the LM head): the native GEMM computes only those rows and leaves zeros below; XLA
computes every row. Linear layers take the metadata itself, so a model cannot forget it.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from jaxserve.config import ATTENTION_BACKENDS
from jaxserve.model import attention as attention_impl
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.quantization import QuantizedWeight

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ops:
    """Which implementation runs each op (see the module docstring)."""

    attention_backend: str = "reference"  # one of ATTENTION_BACKENDS
    # Dense products, the gated MLP, RoPE and the greedy tied head on the native CPU kernels
    # (pallas_kernels/cpu); they have no sharding rule, so only without tensor parallelism.
    native_dense: bool = False
    # 16- and 8-bit KV pools written by the native CPU row writer: XLA:CPU has no bfloat16
    # (or float8) scatter and converts the whole pool to float32 (float16) and back.
    native_kv_write: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")

    # -- dense products --------------------------------------------------------------------
    def _native(self, x, w, out_dtype) -> bool:
        """The native GEMM takes float32 or bfloat16 operands of one dtype and writes that
        dtype or float32; anything else (float16) stays on XLA's dot."""
        dtype = jnp.dtype(x.dtype)
        return (self.native_dense and dtype == jnp.dtype(w.dtype)
                and dtype in (jnp.float32, jnp.bfloat16)
                and out_dtype in (None, dtype, jnp.float32))

    def dense(self, x,  # [..., K]
              w,  # [K, N] ("kn", a Linear kernel) or [N, K] ("nk", a tied embedding)
              num_rows,  # [] int32: the real rows of the flattened x; None: all
              *, w_layout: str = "kn", out_dtype=None) -> jax.Array:  # [..., N]
        """x @ w (x @ w.T for "nk"), accumulated in float32, in x's dtype or `out_dtype`."""
        if isinstance(w, QuantizedWeight):
            return self._quantized_dense(x, w, num_rows, w_layout, out_dtype)
        if self._native(x, w, out_dtype):
            from pallas_kernels.cpu import matmul

            return matmul.matmul(x, w, w_layout=w_layout, out_dtype=out_dtype, rows=num_rows)
        spec = "...k,kn->...n" if w_layout == "kn" else "...k,nk->...n"
        return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)

    def gated_mlp(self, x,  # [T, D]
                  w_gate, w_up,  # [D, F] each
                  num_rows,  # [] int32 real rows of x
                  b_gate=None, b_up=None,  # [F] each, or None
                  ) -> jax.Array:  # [T, F] silu(x @ w_gate + b_gate) * (x @ w_up + b_up)
        if (b_gate is None and b_up is None and not isinstance(w_gate, QuantizedWeight)
                and self._native(x, w_gate, None)):
            from pallas_kernels.cpu import matmul

            # one call, float32 epilogue: the [T, F] gate and up products are never written
            return matmul.gated_mlp(x, w_gate, w_up, rows=num_rows)
        if b_gate is None and b_up is None and self._quantized_native(x, w_gate, w_up):
            from pallas_kernels.cpu import qmatmul

            parts = lambda w: (w.packed, w.scales, w.mins)  # noqa: E731
            return qmatmul.qmatmul_gated(x, parts(w_gate), parts(w_up), bits=w_gate.bits,
                                         group_size=w_gate.group_size, rows=num_rows)
        gate = self.dense(x, w_gate, num_rows)
        up = self.dense(x, w_up, num_rows)
        if b_gate is not None:
            gate, up = gate + b_gate, up + b_up
        return jax.nn.silu(gate) * up

    def register_kernels(self, params) -> None:
        """Builds and registers now every native kernel `params` will call (the
        quantized GEMM where a weight is quantized): executables loaded from the executable
        cache call their handlers without a trace that would register them."""
        is_quantized = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
        if self.native_dense and any(map(is_quantized, jax.tree.leaves(
                params, is_leaf=is_quantized))):
            from pallas_kernels.cpu import qmatmul

            qmatmul.available()

    def _quantized_native(self, x, *ws) -> bool:
        """Whether the native quantized GEMM takes x and the QuantizedWeights `ws` (float32
        in and out; several weights in one call must share their form and shape)."""
        if not (self.native_dense and jnp.dtype(x.dtype) == jnp.float32
                and all(isinstance(w, QuantizedWeight) and w.dtype == jnp.float32
                        for w in ws)):
            return False
        form = lambda w: (w.bits, w.group_size, w.shape, w.scales.dtype,  # noqa: E731
                          w.mins is None)
        if len({form(w) for w in ws}) != 1:
            return False
        from pallas_kernels.cpu import qmatmul

        return qmatmul.available()  # built on first use: float models never build it

    def _quantized_dense(self, x,  # [..., K]
                         w: QuantizedWeight,  # [K, N]
                         num_rows, w_layout: str, out_dtype) -> jax.Array:  # [..., N]
        if w_layout != "kn":
            raise ValueError("a QuantizedWeight is a [K, N] kernel (w_layout 'kn')")
        if out_dtype in (None, jnp.float32) and self._quantized_native(x, w):
            from pallas_kernels.cpu import qmatmul

            return qmatmul.qmatmul(x, w.packed, w.scales, w.mins, bits=w.bits,
                                   group_size=w.group_size, rows=num_rows)
        return jnp.einsum("...k,kn->...n", x, w.dequantize(x.dtype),
                          preferred_element_type=out_dtype)

    def lm_head_argmax(self, hidden,  # [B, D] final hidden states
                       embedding,  # [V, D] the tied embedding, or a [D, V] QuantizedWeight
                       num_rows,  # [] int32 real rows of hidden
                       head_kn=None,  # [D, V] its transposed copy (the loader's), or None
                       bitmask=None,  # [B, W] int32 packed allowed ids, or None: all
                       ) -> jax.Array | None:  # [B] int32; None where no fused kernel runs
        """argmax(hidden @ embedding.T) per row in one native call that never writes the
        [B, V] logits; rows past `num_rows` get token 0. With `bitmask` (structured
        outputs) the ids whose bit is clear count as -inf (float heads only: a quantized
        head's masked rows take the logits path)."""
        if isinstance(embedding, QuantizedWeight):
            if bitmask is not None or not (self.native_dense
                                           and jnp.dtype(hidden.dtype) == jnp.float32):
                return None
            from pallas_kernels.cpu import qmatmul

            if not qmatmul.available():
                return None
            w = embedding
            return qmatmul.qmatmul_argmax(hidden, w.packed, w.scales, w.mins, bits=w.bits,
                                          group_size=w.group_size, rows=num_rows)
        if not self._native(hidden, embedding, None):
            return None
        from pallas_kernels.cpu import matmul

        if head_kn is not None:
            return matmul.lm_head_argmax(hidden, head_kn, w_layout="kn", rows=num_rows,
                                         bitmask=bitmask)
        return matmul.lm_head_argmax(hidden, embedding, rows=num_rows, bitmask=bitmask)

    # -- RoPE --------------------------------------------------------------------------------
    def rope(self, x,  # [T, n, H]
             cos, sin,  # [T, H/2] float32 each (attention factor applied)
             ) -> jax.Array:  # [T, n, H] pairs (i, i + H/2) rotated, in x's dtype
        if (self.native_dense and x.ndim == 3
                and jnp.dtype(x.dtype) in (jnp.float32, jnp.bfloat16)):
            from pallas_kernels.cpu import rope

            return rope.rope(x, cos, sin)  # XLA:CPU runs the concatenation element by element
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, H/2]
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [T, n, H/2] each
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x.dtype)

    # -- the KV cache and attention ------------------------------------------------------------
    def write_rows(self, pool,  # [..., L, S, W] a paged pool
                   slots,  # [T] int32 slot (block * S + offset) of each new row
                   rows,  # [T, ..., W] the new rows, token-major
                   ) -> jax.Array:  # [..., L, S, W]
        return attention_impl.set_slots(pool, slots, rows,
                                        native=self.native_kv_write)

    def write_kv(self, pools,  # one layer's pools: (k, v) or, 8-bit, (k, v, k_scale, v_scale)
                 new_k, new_v,  # [T, K, H] each: this step's keys and values
                 metadata: AttentionMetadata) -> tuple[jax.Array, ...]:  # the pools, updated
        return attention_impl.write_kv(pools, new_k, new_v, metadata.slot_mapping,
                                       native=self.native_kv_write)

    def attention(self, q,  # [T, N, H] queries (RoPE applied)
                  pools,  # one layer's pools (`write_kv`), this step's K/V written
                  metadata: AttentionMetadata, *, sm_scale: float,
                  sliding_window: int | None = None,
                  alibi_slopes=None,  # [N] float32, or None
                  ) -> jax.Array:  # [T, N, H]; zero rows for padding tokens
        return attention_impl.paged_attention(
            q, pools, metadata, backend=self.attention_backend, sm_scale=sm_scale,
            sliding_window=sliding_window, alibi_slopes=alibi_slopes)


def default_attention_backend(platform: str | None = None) -> str:
    """"pallas" on GPU/TPU; on CPU the native kernel, or the reference where it does not
    build (one of ATTENTION_BACKENDS)."""
    if (platform or jax.default_backend()) != "cpu":
        return "pallas"
    from pallas_kernels.ragged_paged_attention import cpu

    if cpu.available():  # a failed build logs its reason (no compiler, or its errors)
        return "cpu"
    logger.warning("the native CPU attention kernel is unavailable (see the warning above): "
                   "using the slower pure-jnp reference")
    return "reference"


def select_ops(attention_backend: str | None = None, *, tensor_parallel_size: int = 1,
               platform: str | None = None) -> Ops:
    """The ops for an engine: `attention_backend` (None: the platform's default), and the
    native CPU kernels wherever they build with SIMD micro-kernels here (their portable
    loops are slower than XLA's), else XLA's."""
    platform = platform or jax.default_backend()
    attention_backend = attention_backend or default_attention_backend(platform)
    native_dense = native_kv_write = False
    if platform == "cpu":
        from pallas_kernels.cpu import matmul, rope, set_rows

        native_kv_write = set_rows.available()
        native_dense = (tensor_parallel_size == 1 and matmul.vectorized()
                        and matmul.available() and rope.available())
    return Ops(attention_backend=attention_backend, native_dense=native_dense,
               native_kv_write=native_kv_write)
