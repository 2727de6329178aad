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
from jaxserve.model.attention import ATTENTION_BACKENDS, paged_attention, write_kv
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import MLP, Embed, Linear, RMSNorm, Rotary, tied_head_argmax
from jaxserve.model.sampler import argmax

KVCache = tuple[jax.Array, jax.Array]  # ([K, L, S, H] key pool, [K, L, S, H] value pool)


class LlamaAttention(nnx.Module):
    """GQA self-attention over the paged KV cache of one layer (RoPE, or ALiBi when a
    subclass sets `alibi` and no `rotary`)."""

    def __init__(self, config: ModelConfig, layer: int, *, attention_backend: str,
                 rngs: nnx.Rngs):
        prefix = f"model.layers.{layer}.self_attn"
        dim, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                          config.num_kv_heads, config.head_dim)
        common = dict(dtype=jnp.dtype(config.dtype), rngs=rngs)
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
                             None if scaling is None else tuple(sorted(scaling.items())))
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.sliding_window = config.layer_sliding_windows[layer]
        self.alibi = None  # ALiBi slopes of the N heads (Baichuan-13B), a static tuple
        self.attention_backend = attention_backend

    def __call__(self, x,          # [T, D]
                 positions,         # [T] int32
                 kv_cache: KVCache,
                 metadata: AttentionMetadata,
                 ) -> tuple[jax.Array, KVCache]:  # [T, D], updated pools
        num_tokens = x.shape[0]
        rows = metadata.num_tokens()  # padding rows are left to zeros (native GEMM)
        q = self.q_proj(x, rows=rows).reshape(num_tokens, self.num_heads, self.head_dim)  # [T, N, H]
        k = self.k_proj(x, rows=rows).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, rows=rows).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:  # None: positions come from ALiBi instead
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        k_pool, v_pool = write_kv(*kv_cache, k, v, metadata.slot_mapping)
        slopes = None if self.alibi is None else jnp.asarray(self.alibi, jnp.float32)  # [N]
        out = paged_attention(q, k_pool, v_pool, metadata, backend=self.attention_backend,
                              sm_scale=self.head_dim ** -0.5,
                              sliding_window=self.sliding_window,
                              alibi_slopes=slopes)  # [T, N, H]
        return self.o_proj(out.reshape(num_tokens, -1), rows=rows), (k_pool, v_pool)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Every family here shares this block: one sets `attention_class` (Baichuan, DeepSeek-V2)
    and/or overrides `make_mlp` (the MoE families), and keeps the norms and residuals.
    """

    attention_class = LlamaAttention

    def __init__(self, config: ModelConfig, layer: int, *, attention_backend: str,
                 rngs: nnx.Rngs):
        prefix = f"model.layers.{layer}"
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                       hf_name=f"{prefix}.input_layernorm.weight")
        self.self_attn = self.attention_class(config, layer, attention_backend=attention_backend,
                                              rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
            hf_name=f"{prefix}.post_attention_layernorm.weight")
        self.mlp = self.make_mlp(config, layer, rngs=rngs)

    def make_mlp(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
        """Layer `layer`'s feed-forward block ([T, D] -> [T, D], called with `rows=`, the
        step's real tokens): the dense gated MLP."""
        return dense_mlp(config, layer, rngs=rngs)

    def __call__(self, x, positions, kv_cache, metadata: AttentionMetadata):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, metadata)
        x = x + attn  # [T, D]
        mlp_out = self.mlp(self.post_attention_layernorm(x), rows=metadata.num_tokens())
        return x + mlp_out, kv_cache


def dense_mlp(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> MLP:
    """The dense gated MLP of width `intermediate_size` at `model.layers.{layer}.mlp`."""
    return MLP(config.hidden_size, config.intermediate_size, hf_name=f"model.layers.{layer}.mlp",
               use_bias=config.mlp_bias, dtype=jnp.dtype(config.dtype), rngs=rngs)


class LlamaForCausalLM(nnx.Module):
    """Embedding, decoder layers, final norm; `compute_logits` applies the LM head.

    Families that differ only in their decoder layer (Mixtral) set `decoder_layer_class`.
    """

    decoder_layer_class = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, *, attention_backend: str = "reference",
                 rngs: nnx.Rngs):
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {attention_backend!r}")
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs,
                                  hf_name="model.embed_tokens.weight")
        self.layers = nnx.List([
            self.decoder_layer_class(config, i, attention_backend=attention_backend, rngs=rngs)
            for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            hf_name="model.norm.weight")
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, hf_name="lm_head", axes=("embed", "vocab"),
            use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, kv_caches: tuple[KVCache, ...],  # one (key, value) pool pair per layer
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

    def greedy_token_ids(self, hidden, *, rows=None):  # [B, D] -> [B] int32
        """The argmax of `compute_logits(hidden)`; with a tied head on CPU, fused with the
        LM head in one native call (the logits are never written). `rows`: as in
        `compute_logits`."""
        if self.lm_head is None:
            head_kn = self.embed_tokens.head_kn
            fused = tied_head_argmax(hidden, self.embed_tokens.embedding[...],
                                     None if head_kn is None else head_kn[...], rows=rows)
            if fused is not None:
                return fused
        return argmax(self.compute_logits(hidden, rows=rows))

    def compute_logits(self, hidden, *, rows=None):  # [..., D] -> [..., V] float32
        """The LM head. `rows` (int32 scalar): only the first `rows` rows of hidden are real
        (the step's sequences before padding); the native GEMM leaves the rest zero."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden, rows=rows)
        return self.lm_head(hidden, preferred_element_type=jnp.float32, rows=rows)
