"""Mixtral: the Llama decoder with its dense MLP swapped for the shared sparse MoE block.

Attention, norms, embedding and LM head are Llama's; each layer's `block_sparse_moe`
routes every token to `num_experts_per_tok` of `num_local_experts` experts (weights
renormalized over the chosen ones). In and out as `LlamaForCausalLM`: a ragged token batch
with its KV pools and `AttentionMetadata` -> final hidden states [T, D] and updated pools.
"""

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import RMSNorm
from jaxserve.model.llama import KVCache, LlamaAttention, LlamaForCausalLM
from jaxserve.model.moe import SparseMoE


def mixtral_moe(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> SparseMoE:
    """Layer `layer`'s sparse MoE block, sized from the transformers MixtralConfig."""
    hf = config.hf_config
    prefix = f"model.layers.{layer}.block_sparse_moe"
    return SparseMoE(config.hidden_size, config.intermediate_size,
                     num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                     renormalize=True, router_name=f"{prefix}.gate",
                     expert_names=tuple(f"{prefix}.experts.{{expert}}.{w}.weight"
                                        for w in ("w1", "w3", "w2")),
                     dtype=jnp.dtype(config.dtype), rngs=rngs,
                     expert_parallel=config.enable_expert_parallel)


class MixtralDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int, *, attention_backend: str,
                 rngs: nnx.Rngs):
        prefix = f"model.layers.{layer}"
        norm = dict(eps=config.rms_norm_eps, dtype=jnp.dtype(config.dtype))
        self.input_layernorm = RMSNorm(config.hidden_size,
                                       hf_name=f"{prefix}.input_layernorm.weight", **norm)
        self.self_attn = LlamaAttention(config, layer, attention_backend=attention_backend,
                                        rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, hf_name=f"{prefix}.post_attention_layernorm.weight", **norm)
        self.block_sparse_moe = mixtral_moe(config, layer, rngs=rngs)

    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, metadata)
        x = x + attn  # [T, D]
        return x + self.block_sparse_moe(self.post_attention_layernorm(x)), kv_cache


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama's embedding, final norm, LM head and step; Mixtral decoder layers."""

    decoder_layer_class = MixtralDecoderLayer
