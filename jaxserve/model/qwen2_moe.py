"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention + the sparse MoE block.

Attention, norms, embedding and LM head are Qwen2's (Llama's with q/k/v biases). A layer's
`mlp` is the shared sparse MoE block (`num_experts` experts of width
`moe_intermediate_size`, top `num_experts_per_tok`, renormalized when `norm_topk_prob`)
plus a shared expert of width `shared_expert_intermediate_size` scaled by
sigmoid(shared_expert_gate(x)); layers in `mlp_only_layers`, or off the
`decoder_sparse_step` stride, keep a dense MLP of width `intermediate_size`.
In and out as `LlamaForCausalLM`.
"""

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import MLP, RMSNorm
from jaxserve.model.llama import KVCache, LlamaAttention, LlamaForCausalLM
from jaxserve.model.moe import SharedExpert, SparseMoE


def is_sparse_layer(hf_config, layer: int) -> bool:
    """transformers' rule: MoE unless listed in mlp_only_layers or off the sparse stride."""
    return (layer not in (getattr(hf_config, "mlp_only_layers", None) or ())
            and hf_config.num_experts > 0 and (layer + 1) % hf_config.decoder_sparse_step == 0)


def qwen2_moe_block(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> SparseMoE:
    """Layer `layer`'s routed experts and gated shared expert, sized from Qwen2MoeConfig."""
    hf, dtype = config.hf_config, jnp.dtype(config.dtype)
    prefix = f"model.layers.{layer}.mlp"
    shared = SharedExpert(config.hidden_size, hf.shared_expert_intermediate_size,
                          hf_name=f"{prefix}.shared_expert",
                          gate_name=f"{prefix}.shared_expert_gate", dtype=dtype, rngs=rngs)
    return SparseMoE(config.hidden_size, hf.moe_intermediate_size,
                     num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                     renormalize=bool(hf.norm_topk_prob), router_name=f"{prefix}.gate",
                     expert_names=tuple(f"{prefix}.experts.{{expert}}.{w}.weight"
                                        for w in ("gate_proj", "up_proj", "down_proj")),
                     dtype=dtype, rngs=rngs, shared_expert=shared,
                     expert_parallel=config.enable_expert_parallel)


class Qwen2MoeDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)), the mlp sparse
    or dense by layer."""

    def __init__(self, config: ModelConfig, layer: int, *, attention_backend: str,
                 rngs: nnx.Rngs):
        prefix = f"model.layers.{layer}"
        dtype = jnp.dtype(config.dtype)
        norm = dict(eps=config.rms_norm_eps, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size,
                                       hf_name=f"{prefix}.input_layernorm.weight", **norm)
        self.self_attn = LlamaAttention(config, layer, attention_backend=attention_backend,
                                        rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, hf_name=f"{prefix}.post_attention_layernorm.weight", **norm)
        if is_sparse_layer(config.hf_config, layer):
            self.mlp = qwen2_moe_block(config, layer, rngs=rngs)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size,
                           hf_name=f"{prefix}.mlp", use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, metadata)
        x = x + attn  # [T, D]
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2's embedding, final norm, LM head and step; Qwen2-MoE decoder layers."""

    decoder_layer_class = Qwen2MoeDecoderLayer
