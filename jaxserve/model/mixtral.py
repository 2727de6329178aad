"""Mixtral: the Llama decoder with its dense MLP swapped for the shared sparse MoE block.

Attention, norms, embedding and LM head are Llama's; each layer's feed-forward (`block_sparse_moe`)
routes every token to `num_experts_per_tok` of `num_local_experts` experts (weights
renormalized over the chosen ones). In and out as `LlamaForCausalLM`: a ragged token batch
with its KV pools and `AttentionMetadata` -> final hidden states [T, D] and updated pools.
"""

import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from jaxserve.model.moe import SparseMoE
from jaxserve.model.ops import Ops


def mixtral_moe(config: ModelConfig, layer: int, *, ops: Ops,
                rngs: nnx.Rngs | None) -> SparseMoE:
    """Layer `layer`'s sparse MoE block, sized from the transformers MixtralConfig."""
    hf = config.hf_config
    prefix = f"model.layers.{layer}.block_sparse_moe"
    return SparseMoE(config.hidden_size, config.intermediate_size,
                     num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                     renormalize=True, router_name=f"{prefix}.gate",
                     expert_names=tuple(f"{prefix}.experts.{{expert}}.{w}.weight"
                                        for w in ("w1", "w3", "w2")),
                     dtype=jnp.dtype(config.dtype), ops=ops, rngs=rngs,
                     expert_parallel=config.enable_expert_parallel)


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's block with the sparse MoE as its feed-forward."""

    def make_mlp(self, config: ModelConfig, layer: int, *, ops: Ops,
                 rngs: nnx.Rngs | None) -> SparseMoE:
        return mixtral_moe(config, layer, ops=ops, rngs=rngs)


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama's embedding, final norm, LM head and step; Mixtral decoder layers."""

    decoder_layer_class = MixtralDecoderLayer
