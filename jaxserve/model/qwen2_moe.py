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
from jaxserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, dense_mlp
from jaxserve.model.moe import SharedExpert, SparseMoE
from jaxserve.model.ops import Ops


def is_sparse_layer(hf_config, layer: int) -> bool:
    """transformers' rule: MoE unless listed in mlp_only_layers or off the sparse stride."""
    return (layer not in (getattr(hf_config, "mlp_only_layers", None) or ())
            and hf_config.num_experts > 0 and (layer + 1) % hf_config.decoder_sparse_step == 0)


def qwen2_moe_block(config: ModelConfig, layer: int, *, ops: Ops,
                    rngs: nnx.Rngs | None) -> SparseMoE:
    """Layer `layer`'s routed experts and gated shared expert, sized from Qwen2MoeConfig."""
    hf, dtype = config.hf_config, jnp.dtype(config.dtype)
    prefix = f"model.layers.{layer}.mlp"
    shared = SharedExpert(config.hidden_size, hf.shared_expert_intermediate_size,
                          hf_name=f"{prefix}.shared_expert",
                          gate_name=f"{prefix}.shared_expert_gate", dtype=dtype, ops=ops,
                          rngs=rngs)
    return SparseMoE(config.hidden_size, hf.moe_intermediate_size,
                     num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                     renormalize=bool(hf.norm_topk_prob), router_name=f"{prefix}.gate",
                     expert_names=tuple(f"{prefix}.experts.{{expert}}.{w}.weight"
                                        for w in ("gate_proj", "up_proj", "down_proj")),
                     dtype=dtype, ops=ops, rngs=rngs, shared_expert=shared,
                     expert_parallel=config.enable_expert_parallel)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    """Llama's block (Qwen2 attention); the feed-forward sparse or dense by layer."""

    def make_mlp(self, config: ModelConfig, layer: int, *, ops: Ops,
                 rngs: nnx.Rngs | None) -> nnx.Module:
        if is_sparse_layer(config.hf_config, layer):
            return qwen2_moe_block(config, layer, ops=ops, rngs=rngs)
        return dense_mlp(config, layer, ops=ops, rngs=rngs)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2's embedding, final norm, LM head and step; Qwen2-MoE decoder layers."""

    decoder_layer_class = Qwen2MoeDecoderLayer
