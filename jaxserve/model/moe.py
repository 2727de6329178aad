"""The sparse mixture-of-experts block shared by every MoE family (Mixtral, Qwen2-MoE, ...).

In: hidden states [T, D]. A router scores E experts per token (softmax); each token keeps
its top k (optionally only within its best expert groups, renormalized, scaled: `route`).
Token copies are sorted by expert and run through grouped matmuls (`jax.lax.ragged_dot`)
over stacked expert weights, so only the chosen experts compute; the weighted outputs are
summed back in token order. An optional shared expert (a dense MLP, optionally gated) adds
its output for every token. Under a mesh the experts run per rank
(`parallel.expert_parallel.shard_experts`). Out: [T, D].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.layers import MLP, Linear, init_normal
from jaxserve.model.ops import Ops
from jaxserve.parallel.expert_parallel import DOWN_AXES, UP_AXES, shard_experts
from jaxserve.parallel.tensor_parallel import model_axis_size


def stacked_param(value: jax.Array, *, hf_name: str, axes: tuple[str | None, ...]) -> nnx.Param:
    """[E, ...] expert weights the checkpoint keeps one tensor per expert, transposed:
    the loader reads `hf_name.format(expert=e)` for each e < E (`hf_stack`) and stacks them."""
    if len(axes) != value.ndim or "{expert}" not in hf_name:
        raise ValueError(f"{hf_name}: needs an {{expert}} field and axes matching {value.shape}")
    return nnx.Param(value, hf_name=hf_name, hf_transpose=True, hf_stack=value.shape[0],
                     axes=axes)


def route(router_logits,  # [T, E]
          *, top_k: int, renormalize: bool = False, num_groups: int = 1,
          topk_groups: int = 1, scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] float32, experts [T, k] int32): softmax, then the top k of each token.

    `num_groups` > 1 is DeepSeek-V2's group-limited greedy: the E experts form `num_groups`
    equal groups, a group scores its best expert, and only the experts of the token's
    `topk_groups` best groups stay eligible (the others' scores become 0). `renormalize`
    divides the k weights by their sum (Mixtral; Qwen2-MoE's `norm_topk_prob`); the weights
    are then multiplied by `scaling_factor` (DeepSeek's `routed_scaling_factor`).
    """
    num_tokens, num_experts = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, E]
    if num_groups > 1:
        grouped = probs.reshape(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
        _, best = jax.lax.top_k(grouped.max(axis=-1), topk_groups)  # [T, topk_groups]
        keep = jnp.zeros((num_tokens, num_groups), bool).at[
            jnp.arange(num_tokens)[:, None], best].set(True)  # [T, G]
        probs = jnp.where(keep[:, :, None], grouped, 0.0).reshape(num_tokens, num_experts)
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k] each
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * scaling_factor, experts.astype(jnp.int32)


def grouped_experts(x,        # [T, D]
                    weights,  # [T, k] float32 routing weights
                    experts,  # [T, k] int32 chosen expert ids
                    w_gate,   # [E', D, F'] E' experts from global id `first_expert` on
                    w_up,     # [E', D, F']
                    w_down,   # [E', F', D]
                    first_expert=0,  # int or traced int32 scalar
                    ) -> jax.Array:  # [T, D] float32
    """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) via ragged_dot over expert groups.

    Only experts first_expert .. first_expert + E' - 1 compute; copies routed elsewhere are
    sorted last, outside every group, and contribute 0 (one rank's share under a mesh).
    """
    num_tokens, top_k = experts.shape
    num_local = w_gate.shape[0]
    local = experts - first_expert  # [T, k]
    mine = (local >= 0) & (local < num_local)  # [T, k]
    flat = jnp.where(mine, local, num_local).reshape(-1)  # [T*k]: copy i is token i // k's
    order = jnp.argsort(flat, stable=True)  # [T*k] copies grouped by expert, others last
    rows = jnp.take(x, order // top_k, axis=0)  # [T*k, D] sorted by expert
    group_sizes = jnp.bincount(flat, length=num_local).astype(jnp.int32)  # [E'] (others dropped)
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)  # [T*k, F']
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)  # [T*k, F']
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [T*k, D]
    unsorted = jnp.zeros_like(out).at[order].set(out)  # [T*k, D] back in copy order
    weights = jnp.where(mine, weights, 0.0)  # [T, k]
    unsorted = jnp.where(mine.reshape(-1, 1), unsorted, 0)  # rows of no group: never read
    return jnp.einsum("tkd,tk->td", unsorted.reshape(num_tokens, top_k, -1).astype(jnp.float32),
                      weights)


class SharedExpert(nnx.Module):
    """A dense SiLU-gated MLP every token goes through beside the routed experts.

    `hf_name` is the MLP's prefix (`{hf_name}.gate_proj.weight`, ...): DeepSeek-V2's
    "model.layers.i.mlp.shared_experts" (width moe_intermediate_size * n_shared_experts),
    Qwen2-MoE's "model.layers.i.mlp.shared_expert". With `gate_name` (Qwen2-MoE's
    "model.layers.i.mlp.shared_expert_gate", a [D] -> 1 linear) the output is scaled by
    sigmoid(gate(x)); without, it is added as is.
    """

    def __init__(self, dim: int, width: int, *, hf_name: str, gate_name: str | None = None,
                 dtype, ops: Ops, rngs: nnx.Rngs | None):
        self.mlp = MLP(dim, width, hf_name=hf_name, use_bias=False, dtype=dtype, ops=ops,
                       rngs=rngs)
        self.gate = None if gate_name is None else Linear(
            dim, 1, hf_name=gate_name, axes=("embed", None), use_bias=False, dtype=dtype,
            ops=ops, rngs=rngs)  # [D, 1]

    def __call__(self, x,  # [T, D]
                 metadata: AttentionMetadata):  # -> [T, D]
        out = self.mlp(x, metadata)
        return out if self.gate is None else jax.nn.sigmoid(self.gate(x, metadata)) * out


class SparseMoE(nnx.Module):
    """Router + E SiLU-gated experts with stacked weights (+ an optional shared expert).

    `expert_names` are (gate, up, down) HF weight names containing `{expert}`, e.g.
    "model.layers.0.block_sparse_moe.experts.{expert}.w1.weight"; the loader stacks them.
    `renormalize`, `num_groups`, `topk_groups`, `scaling_factor`: see `route`.
    `expert_parallel` must match the rules the params were placed with
    (`parallel.expert_parallel.sharding_rules`): E split over "model" instead of F.
    """

    def __init__(self, dim: int, width: int, *, num_experts: int, top_k: int,
                 renormalize: bool, router_name: str, expert_names: tuple[str, str, str],
                 dtype, ops: Ops, rngs: nnx.Rngs | None, num_groups: int = 1,
                 topk_groups: int = 1,
                 scaling_factor: float = 1.0, shared_expert: SharedExpert | None = None,
                 expert_parallel: bool = False):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"SparseMoE: top_k must be in [1, num_experts={num_experts}], "
                             f"got {top_k}")
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"SparseMoE: num_groups must be >= 1 and divide num_experts="
                             f"{num_experts}, got {num_groups}")
        if not 0 < topk_groups <= num_groups:
            raise ValueError(f"SparseMoE: topk_groups must be in [1, num_groups={num_groups}], "
                             f"got {topk_groups}")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"SparseMoE: top_k={top_k} exceeds the experts of topk_groups="
                             f"{topk_groups} groups")
        self.gate = Linear(dim, num_experts, hf_name=router_name, axes=("embed", None),
                           use_bias=False, dtype=dtype, ops=ops, rngs=rngs)  # router [D, E]
        gate_name, up_name, down_name = expert_names

        def experts(shape, name, axes):
            return stacked_param(init_normal(rngs, shape, dtype), hf_name=name, axes=axes)

        self.w_gate = experts((num_experts, dim, width), gate_name, UP_AXES)  # [E, D, F]
        self.w_up = experts((num_experts, dim, width), up_name, UP_AXES)  # [E, D, F]
        self.w_down = experts((num_experts, width, dim), down_name, DOWN_AXES)  # [E, F, D]
        self.shared_expert = shared_expert
        self.top_k, self.renormalize = top_k, renormalize
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.scaling_factor, self.expert_parallel = scaling_factor, expert_parallel

    def __call__(self, x,  # [T, D]
                 metadata: AttentionMetadata):  # -> [T, D]
        weights, experts = route(self.gate(x, metadata), top_k=self.top_k,
                                 renormalize=self.renormalize,
                                 num_groups=self.num_groups, topk_groups=self.topk_groups,
                                 scaling_factor=self.scaling_factor)
        stacks = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if model_axis_size() > 1:
            out = shard_experts(grouped_experts, x, weights, experts, *stacks,
                                expert_parallel=self.expert_parallel)
        else:
            out = grouped_experts(x, weights, experts, *stacks)
        out = out.astype(x.dtype)  # [T, D]
        return out if self.shared_expert is None else out + self.shared_expert(x, metadata)
