"""Baichuan and Baichuan2 (7B with RoPE, 13B with ALiBi): Llama's body, fused QKV, NormHead.

The checkpoint fuses q, k and v into one `W_pack` weight ([3D, D], rows q then k then v); each
projection here is its row range (`hf_rows`), so TP shards q and k/v heads as in Llama.
Positions: RoPE or ALiBi, from config.json's `position_embedding` ("rope" | "alibi", our
extension for test checkpoints) when present, else vLLM's rule: hidden_size 4096 (7B) RoPE,
any other (13B) ALiBi. Baichuan2's NormHead L2-normalises each LM-head row once, at load.
"""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.layers import Linear, Rotary, init_normal
from jaxserve.model.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from jaxserve.model.ops import Ops

POSITION_EMBEDDINGS = ("rope", "alibi")
_BAICHUAN2_VOCAB_SIZE = 125696  # vLLM's test for a Baichuan2 (NormHead) checkpoint


def alibi_slopes(num_heads: int) -> np.ndarray:  # [N] float32
    """ALiBi slopes of BLOOM / Baichuan-13B: for the largest power of two n <= N, heads
    0..n-1 get b**1..b**n with b = 2**(-8/n); the other N-n get c**1, c**3, ... with
    c = 2**(-4/n) (the odd slopes of 2n heads)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * (num_heads - closest), 2)]
    return np.asarray(slopes, np.float32)


def position_embedding(config: ModelConfig) -> str:
    """"rope" or "alibi": config.json's `position_embedding`, else RoPE iff D == 4096."""
    explicit = getattr(config.hf_config, "position_embedding", None)
    if explicit is None:
        return "rope" if config.hidden_size == 4096 else "alibi"
    if str(explicit).lower() not in POSITION_EMBEDDINGS:
        raise ValueError(f"config.json position_embedding must be one of "
                         f"{POSITION_EMBEDDINGS}, got {explicit!r}")
    return str(explicit).lower()


def uses_norm_head(config: ModelConfig) -> bool:
    """config.json's `norm_head` when present, else vLLM's rule: Baichuan2's 125696 vocab."""
    explicit = getattr(config.hf_config, "norm_head", None)
    return config.vocab_size == _BAICHUAN2_VOCAB_SIZE if explicit is None else bool(explicit)


class PackedLinear(Linear):
    """A bias-free Linear whose kernel is rows [start, stop) of a fused checkpoint weight."""

    def __init__(self, in_features: int, row_range: tuple[int, int, int], *, hf_name: str,
                 axes: tuple[str, str], dtype, ops: Ops, rngs: nnx.Rngs | None):
        start, stop, _ = row_range  # (start, stop, rows of the fused tensor)
        value = init_normal(rngs, (in_features, stop - start), dtype)
        self.kernel = nnx.Param(value, hf_name=f"{hf_name}.weight",
                                hf_transpose=True, axes=axes, hf_rows=row_range)  # [in, out]
        self.bias = None
        self.ops = ops


class BaichuanAttention(LlamaAttention):
    """Llama's attention step with q, k, v read from W_pack and RoPE or ALiBi positions."""

    def __init__(self, config: ModelConfig, layer: int, *, ops: Ops, rngs: nnx.Rngs | None):
        prefix = f"model.layers.{layer}.self_attn"
        dim, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                          config.num_kv_heads, config.head_dim)
        common = dict(dtype=jnp.dtype(config.dtype), ops=ops, rngs=rngs)
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        total = q_rows + 2 * kv_rows
        packed = f"{prefix}.W_pack"
        self.q_proj = PackedLinear(dim, (0, q_rows, total), hf_name=packed,
                                   axes=("embed", "q_heads"), **common)
        self.k_proj = PackedLinear(dim, (q_rows, q_rows + kv_rows, total), hf_name=packed,
                                   axes=("embed", "kv_heads"), **common)
        self.v_proj = PackedLinear(dim, (q_rows + kv_rows, total, total), hf_name=packed,
                                   axes=("embed", "kv_heads"), **common)
        self.o_proj = Linear(heads * head_dim, dim, hf_name=f"{prefix}.o_proj",
                             axes=("q_heads", "embed"), use_bias=False, **common)
        rope = position_embedding(config) == "rope"
        self.rotary = Rotary(head_dim, config.rope_theta, ops=ops) if rope else None
        # [N] slopes of all heads (TP slices them per rank); a tuple: static, not a param
        self.alibi = None if rope else tuple(float(s) for s in alibi_slopes(heads))
        self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.sliding_window = None
        self.ops = ops


class BaichuanDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm residual block around Baichuan's attention."""

    attention_class = BaichuanAttention


class BaichuanForCausalLM(LlamaForCausalLM):
    """Baichuan / Baichuan2: Llama's embedding, layers and norm; a NormHead for Baichuan2."""

    decoder_layer_class = BaichuanDecoderLayer

    def __init__(self, config: ModelConfig, *, ops: Ops, rngs: nnx.Rngs | None):
        if config.tie_word_embeddings:
            raise ValueError("ModelConfig.tie_word_embeddings must be False for Baichuan")
        super().__init__(config, ops=ops, rngs=rngs)
        if uses_norm_head(config):  # each vocab row (a kernel column) scaled to unit norm
            self.lm_head.kernel = nnx.Param(
                self.lm_head.kernel[...], hf_name="lm_head.weight", hf_transpose=True,
                axes=("embed", "vocab"), hf_normalize_axis=0)  # [D, V]
