"""DeepSeek-V2 / V2-Lite: multi-head latent attention (MLA) and DeepSeekMoE.

Attention compresses each token's keys and values into one latent of `kv_lora_rank` (C)
values plus a decoupled RoPE key of `qk_rope_head_dim` (Hr) values; the paged pool keeps only
those C + Hr values per token (`ModelConfig.kv_latent_dim`). The key and value
up-projections (`kv_b_proj`, split into W_UK and W_UV) are absorbed into the query and output
sides, so every step is multi-query attention over the latents (`model/mla_attention.py`).
Queries go through a LoRA (`q_a_proj`, norm, `q_b_proj`) when `q_lora_rank` is set. RoPE
rotates interleaved pairs, with YaRN scaling; YaRN's `mscale_all_dim` also rescales the
softmax (squared). The first `first_k_dense_replace` layers use a dense MLP, the rest the
shared MoE block with DeepSeek's group-limited greedy routing, its routed scaling factor and
always-on shared experts. In and out as `LlamaForCausalLM`, with one latent pool per layer.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import Linear, RMSNorm, Rotary
from jaxserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, dense_mlp
from jaxserve.model.mla_attention import mla_paged_attention
from jaxserve.model.moe import SharedExpert, SparseMoE
from jaxserve.model.ops import Ops

LatentCache = tuple[jax.Array]  # ([L, S, C + Hr] latent pool,)
# DeepSeek-V2's q_a / kv_a norms keep transformers' default epsilon, not rms_norm_eps.
_LORA_NORM_EPS = 1e-6


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN."""
    hf = config.hf_config
    scale = (hf.qk_nope_head_dim + hf.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


class DeepseekV2Attention(nnx.Module):
    """MLA over the paged latent pool of one layer, in the absorbed form."""

    def __init__(self, config: ModelConfig, layer: int, *, ops: Ops, rngs: nnx.Rngs | None):
        hf = config.hf_config
        prefix = f"model.layers.{layer}.self_attn"
        dim, heads = config.hidden_size, config.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = (hf.qk_nope_head_dim, hf.qk_rope_head_dim,
                                                    hf.v_head_dim)
        self.rank, self.num_heads = hf.kv_lora_rank, heads
        qk_dim = self.nope_dim + self.rope_dim
        common = dict(dtype=jnp.dtype(config.dtype), ops=ops, rngs=rngs)
        norm = dict(eps=_LORA_NORM_EPS, dtype=jnp.dtype(config.dtype))
        bias = config.attention_bias
        if hf.q_lora_rank:
            self.q_a_proj = Linear(dim, hf.q_lora_rank, hf_name=f"{prefix}.q_a_proj",
                                   axes=("embed", None), use_bias=bias, **common)
            self.q_a_layernorm = RMSNorm(hf.q_lora_rank, hf_name=f"{prefix}.q_a_layernorm.weight",
                                         **norm)
            self.q_b_proj = Linear(hf.q_lora_rank, heads * qk_dim, hf_name=f"{prefix}.q_b_proj",
                                   axes=(None, "q_heads"), use_bias=False, **common)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Linear(dim, heads * qk_dim, hf_name=f"{prefix}.q_proj",
                                 axes=("embed", "q_heads"), use_bias=False, **common)
        self.kv_a_proj_with_mqa = Linear(dim, self.rank + self.rope_dim,
                                         hf_name=f"{prefix}.kv_a_proj_with_mqa",
                                         axes=("embed", None), use_bias=bias, **common)
        self.kv_a_layernorm = RMSNorm(self.rank, hf_name=f"{prefix}.kv_a_layernorm.weight",
                                      **norm)
        # [C, N * (nope + v)]: per head, the key (W_UK) then the value (W_UV) up-projection.
        self.kv_b_proj = Linear(self.rank, heads * (self.nope_dim + self.v_dim),
                                hf_name=f"{prefix}.kv_b_proj", axes=(None, "q_heads"),
                                use_bias=False, **common)
        # read as a [C, N, nope + v] tensor (the absorbed form), not through Ops.dense
        self.kv_b_proj.kernel.set_metadata(quantizable=False)
        self.o_proj = Linear(heads * self.v_dim, dim, hf_name=f"{prefix}.o_proj",
                             axes=("q_heads", "embed"), use_bias=config.o_proj_bias, **common)
        scaling = config.rope_scaling
        self.rotary = Rotary(self.rope_dim, config.rope_theta,
                             None if scaling is None else tuple(sorted(scaling.items())),
                             interleaved=True, ops=ops)
        self.sm_scale = softmax_scale(config)
        # MLA always attends with the latent reference (see mla_paged_attention), whatever
        # the attention backend; the pool write and the projections go through the ops.
        self.ops = ops

    def _queries(self, x, metadata: AttentionMetadata):  # [T, D] -> [T, N, nope + rope]
        if self.q_proj is not None:
            q = self.q_proj(x, metadata)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, metadata)), metadata)
        return q.reshape(x.shape[0], self.num_heads, -1)

    def __call__(self, x,          # [T, D]
                 positions,         # [T] int32
                 kv_cache: LatentCache,
                 metadata: AttentionMetadata,
                 ) -> tuple[jax.Array, LatentCache]:  # [T, D], updated pool
        num_tokens = x.shape[0]
        q = self._queries(x, metadata)  # [T, N, nope + rope]
        q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
        latent = self.kv_a_proj_with_mqa(x, metadata)  # [T, C + Hr]
        c = self.kv_a_layernorm(latent[:, :self.rank])  # [T, C]
        k_rope = self.rotary(latent[:, None, self.rank:], positions)[:, 0]  # [T, Hr]
        q_rope = self.rotary(q_rope, positions)  # [T, N, Hr]
        w_b = self.kv_b_proj.kernel[...].reshape(self.rank, self.num_heads, -1)  # [C, N, nope+v]
        w_uk, w_uv = w_b[..., :self.nope_dim], w_b[..., self.nope_dim:]  # [C, N, nope], [C, N, v]
        q_latent = jnp.einsum("tnh,rnh->tnr", q_nope, w_uk)  # [T, N, C]
        (pool,) = kv_cache
        pool = self.ops.write_rows(pool, metadata.slot_mapping,
                                   jnp.concatenate([c, k_rope], axis=-1))  # [L, S, C + Hr]
        out = mla_paged_attention(q_latent, q_rope, pool, metadata,
                                  sm_scale=self.sm_scale)  # [T, N, C]
        out = jnp.einsum("tnr,rnv->tnv", out, w_uv)  # [T, N, v]
        return self.o_proj(out.reshape(num_tokens, -1), metadata), (pool,)


def deepseek_moe(config: ModelConfig, layer: int, *, ops: Ops,
                 rngs: nnx.Rngs | None) -> SparseMoE:
    """Layer `layer`'s DeepSeekMoE block: routed experts plus the (ungated) shared experts."""
    hf, dtype = config.hf_config, jnp.dtype(config.dtype)
    prefix = f"model.layers.{layer}.mlp"
    grouped = hf.topk_method == "group_limited_greedy"
    shared = SharedExpert(config.hidden_size, hf.moe_intermediate_size * hf.n_shared_experts,
                          hf_name=f"{prefix}.shared_experts", dtype=dtype, ops=ops,
                          rngs=rngs) if hf.n_shared_experts else None
    return SparseMoE(
        config.hidden_size, hf.moe_intermediate_size, num_experts=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok, renormalize=bool(getattr(hf, "norm_topk_prob", False)),
        num_groups=hf.n_group if grouped else 1, topk_groups=hf.topk_group if grouped else 1,
        scaling_factor=float(hf.routed_scaling_factor), router_name=f"{prefix}.gate",
        expert_names=tuple(f"{prefix}.experts.{{expert}}.{w}_proj.weight"
                           for w in ("gate", "up", "down")),
        shared_expert=shared, expert_parallel=config.enable_expert_parallel,
        dtype=dtype, ops=ops, rngs=rngs)


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    """Llama's block around MLA; DeepSeekMoE after the first `first_k_dense_replace` layers."""

    attention_class = DeepseekV2Attention

    def make_mlp(self, config: ModelConfig, layer: int, *, ops: Ops,
                 rngs: nnx.Rngs | None) -> nnx.Module:
        hf = config.hf_config
        if layer >= hf.first_k_dense_replace and hf.n_routed_experts:
            return deepseek_moe(config, layer, ops=ops, rngs=rngs)
        return dense_mlp(config, layer, ops=ops, rngs=rngs)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """Llama's embedding, final norm, LM head and step; DeepSeek-V2 decoder layers."""

    decoder_layer_class = DeepseekV2DecoderLayer
