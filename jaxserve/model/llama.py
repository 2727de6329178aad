"""The Llama family: LlamaForCausalLM, Qwen2 / Qwen2.5, Mistral and Qwen3, one NNX module tree.

The members differ only in what `ModelConfig` records: q/k/v (and o) biases, per-head q/k
RMSNorm (Qwen3), sliding windows (Mistral), tied embeddings, the RoPE variant and a head
dim that need not be D / N. In: a ragged token batch, its positions, the per-layer KV pools
and `AttentionMetadata`; out: final hidden states [T, D] and the updated pools.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import MLP, Embed, Linear, RMSNorm, Rotary
from jaxserve.model.ops import Ops
from jaxserve.model.sampling.sampler import apply_token_bitmask, argmax

# ([K, L, S, H] key pool, [K, L, S, H] value pool), and with an 8-bit KV cache their
# [K, L, S, 1] float16 scale pools after them (pallas_kernels' kv_quant.py)
KVCache = tuple[jax.Array, ...]


class LlamaAttention(nnx.Module):
    """GQA self-attention over the paged KV cache of one layer (RoPE, or ALiBi when a
    subclass sets `alibi` and no `rotary`)."""

    def __init__(self, config: ModelConfig, layer: int, *, ops: Ops, rngs: nnx.Rngs | None):
        prefix = f"model.layers.{layer}.self_attn"
        dim, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                          config.num_kv_heads, config.head_dim)
        common = dict(dtype=jnp.dtype(config.dtype), ops=ops, rngs=rngs)
        bias = config.attention_bias
        self.q_proj = Linear(dim, heads * head_dim, hf_name=f"{prefix}.q_proj",
                             axes=("embed", "q_heads"), use_bias=bias, **common)
        self.k_proj = Linear(dim, kv_heads * head_dim, hf_name=f"{prefix}.k_proj",
                             axes=("embed", "kv_heads"), use_bias=bias, **common)
        self.v_proj = Linear(dim, kv_heads * head_dim, hf_name=f"{prefix}.v_proj",
                             axes=("embed", "kv_heads"), use_bias=bias, **common)
        self.o_proj = Linear(heads * head_dim, dim, hf_name=f"{prefix}.o_proj",
                             axes=("q_heads", "embed"), use_bias=config.o_proj_bias, **common)
        norm = dict(eps=config.rms_norm_eps, axis="head_dim", dtype=jnp.dtype(config.dtype))
        self.q_norm = (RMSNorm(head_dim, hf_name=f"{prefix}.q_norm.weight", **norm)
                       if config.qk_norm else None)
        self.k_norm = (RMSNorm(head_dim, hf_name=f"{prefix}.k_norm.weight", **norm)
                       if config.qk_norm else None)
        scaling = config.rope_scaling
        self.rotary = Rotary(head_dim, config.rope_theta,
                             None if scaling is None else tuple(sorted(scaling.items())),
                             ops=ops)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.sliding_window = config.layer_sliding_windows[layer]
        self.alibi = None  # ALiBi slopes of the N heads (Baichuan-13B), a static tuple
        self.ops = ops

    def __call__(self, x,          # [T, D]
                 positions,         # [T] int32
                 kv_cache: KVCache,
                 metadata: AttentionMetadata,
                 ) -> tuple[jax.Array, KVCache]:  # [T, D], updated pools
        num_tokens = x.shape[0]
        q = self.q_proj(x, metadata).reshape(num_tokens, self.num_heads, self.head_dim)  # [T, N, H]
        k = self.k_proj(x, metadata).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, metadata).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:  # None: positions come from ALiBi instead
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        kv_cache = self.ops.write_kv(kv_cache, k, v, metadata)
        slopes = None if self.alibi is None else jnp.asarray(self.alibi, jnp.float32)  # [N]
        out = self.ops.attention(q, kv_cache, metadata, sm_scale=self.head_dim ** -0.5,
                                 sliding_window=self.sliding_window,
                                 alibi_slopes=slopes)  # [T, N, H]
        return self.o_proj(out.reshape(num_tokens, -1), metadata), kv_cache


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Every family here shares this block: one sets `attention_class` (Baichuan, DeepSeek-V2)
    and/or overrides `make_mlp` (the MoE families), and keeps the norms and residuals.
    """

    attention_class = LlamaAttention

    def __init__(self, config: ModelConfig, layer: int, *, ops: Ops, rngs: nnx.Rngs | None):
        prefix = f"model.layers.{layer}"
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                       hf_name=f"{prefix}.input_layernorm.weight")
        self.self_attn = self.attention_class(config, layer, ops=ops, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
            hf_name=f"{prefix}.post_attention_layernorm.weight")
        self.mlp = self.make_mlp(config, layer, ops=ops, rngs=rngs)

    def make_mlp(self, config: ModelConfig, layer: int, *, ops: Ops,
                 rngs: nnx.Rngs | None) -> nnx.Module:
        """Layer `layer`'s feed-forward block ([T, D], AttentionMetadata -> [T, D]): the
        dense gated MLP."""
        return dense_mlp(config, layer, ops=ops, rngs=rngs)

    def __call__(self, x, positions, kv_cache, metadata: AttentionMetadata):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, metadata)
        x = x + attn  # [T, D]
        mlp_out = self.mlp(self.post_attention_layernorm(x), metadata)
        return x + mlp_out, kv_cache


def dense_mlp(config: ModelConfig, layer: int, *, ops: Ops, rngs: nnx.Rngs | None) -> MLP:
    """The dense gated MLP of width `intermediate_size` at `model.layers.{layer}.mlp`."""
    return MLP(config.hidden_size, config.intermediate_size, hf_name=f"model.layers.{layer}.mlp",
               use_bias=config.mlp_bias, dtype=jnp.dtype(config.dtype), ops=ops, rngs=rngs)


class LlamaForCausalLM(nnx.Module):
    """Embedding, decoder layers, final norm; `compute_logits` applies the LM head.

    Families that differ only in their decoder layer (Mixtral) set `decoder_layer_class`.
    """

    decoder_layer_class = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, *, ops: Ops, rngs: nnx.Rngs | None):
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, ops=ops,
                                  rngs=rngs, hf_name="model.embed_tokens.weight")
        self.layers = nnx.List([
            self.decoder_layer_class(config, i, ops=ops, rngs=rngs)
            for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            hf_name="model.norm.weight")
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, hf_name="lm_head", axes=("embed", "vocab"),
            use_bias=False, dtype=dtype, ops=ops, rngs=rngs)

    def __call__(self, kv_caches: tuple[KVCache, ...],  # each layer's pools (see KVCache)
                 input_ids,  # [T] int32
                 positions,  # [T] int32
                 metadata: AttentionMetadata,
                 ) -> tuple[jax.Array, tuple[KVCache, ...]]:  # [T, D] final hidden states
        x = self.embed_tokens(input_ids)  # [T, D]
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, kv_cache = layer(x, positions, kv_cache, metadata)
            new_caches.append(kv_cache)
        return self.norm(x), tuple(new_caches)

    def greedy_token_ids(self, hidden,  # [B, D]
                         num_rows,  # [] int32 real rows of hidden (the step's sequences)
                         bitmask=None,  # [B, W] int32 allowed ids (structured outputs)
                         ):  # -> [B] int32
        """The argmax of `compute_logits(hidden)`, over the ids `bitmask` allows if given;
        with a tied head on CPU, fused with the LM head in one native call (the logits are
        never written)."""
        if self.lm_head is None:
            fused = self.embed_tokens.argmax(hidden, num_rows, bitmask)
            if fused is not None:
                return fused
        logits = self.compute_logits(hidden, num_rows)  # [B, V]
        if bitmask is not None:
            logits = apply_token_bitmask(logits, bitmask)
        return argmax(logits)

    def compute_logits(self, hidden,  # [..., D]
                       num_rows=None,  # [] int32 real rows of hidden, or None: all
                       ):  # -> [..., V] float32
        """The LM head; rows past `num_rows` may be left zero (the native GEMM skips them)."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden, num_rows)
        return self.lm_head.apply(hidden, num_rows, out_dtype=jnp.float32)
