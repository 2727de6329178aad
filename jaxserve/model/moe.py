"""The sparse mixture-of-experts block shared by every MoE family (Mixtral first).

In: hidden states [T, D]. A router scores E experts per token; each token keeps its top k
(renormalized when the family does). Token copies are sorted by expert and run through
grouped matmuls (`jax.lax.ragged_dot`) over stacked expert weights, so only the chosen
experts compute; the weighted outputs are summed back in token order. Out: [T, D].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.model.layers import Linear


def stacked_param(value: jax.Array, *, hf_name: str, axes: tuple[str | None, ...]) -> nnx.Param:
    """[E, ...] expert weights the checkpoint keeps one tensor per expert, transposed:
    the loader reads `hf_name.format(expert=e)` for each e < E (`hf_stack`) and stacks them."""
    if len(axes) != value.ndim or "{expert}" not in hf_name:
        raise ValueError(f"{hf_name}: needs an {{expert}} field and axes matching {value.shape}")
    return nnx.Param(value, hf_name=hf_name, hf_transpose=True, hf_stack=value.shape[0],
                     axes=axes)


def route(router_logits,  # [T, E]
          *, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] float32, experts [T, k] int32): softmax, then the top k of each token."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k] each
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def grouped_experts(x,        # [T, D]
                    weights,  # [T, k] float32 routing weights
                    experts,  # [T, k] int32 chosen expert ids
                    w_gate,   # [E, D, F]
                    w_up,     # [E, D, F]
                    w_down,   # [E, F, D]
                    ) -> jax.Array:  # [T, D]
    """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) via ragged_dot over expert groups."""
    num_tokens, top_k = experts.shape
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)  # [T*k]: copy i belongs to token i // k
    order = jnp.argsort(flat, stable=True)  # [T*k] copies grouped by expert
    rows = jnp.take(x, order // top_k, axis=0)  # [T*k, D] sorted by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)  # [T*k, F]
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)  # [T*k, F]
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [T*k, D]
    unsorted = jnp.zeros_like(out).at[order].set(out)  # [T*k, D] back in copy order
    combined = jnp.einsum("tkd,tk->td", unsorted.reshape(num_tokens, top_k, -1).astype(jnp.float32),
                          weights)  # [T, D]
    return combined.astype(x.dtype)


class SparseMoE(nnx.Module):
    """Router + E SiLU-gated experts with stacked weights; HF names are per-expert templates.

    `expert_names` are (gate, up, down) HF weight names containing `{expert}`, e.g.
    "model.layers.0.block_sparse_moe.experts.{expert}.w1.weight"; the loader stacks them.
    """

    def __init__(self, dim: int, width: int, *, num_experts: int, top_k: int,
                 renormalize: bool, router_name: str, expert_names: tuple[str, str, str],
                 dtype, rngs: nnx.Rngs):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"SparseMoE: top_k must be in [1, num_experts={num_experts}], "
                             f"got {top_k}")
        self.gate = Linear(dim, num_experts, hf_name=router_name, axes=("embed", None),
                           use_bias=False, dtype=dtype, rngs=rngs)  # router [D, E]
        gate_name, up_name, down_name = expert_names

        def experts(shape, name, axes):
            init = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
            return stacked_param(init.astype(dtype), hf_name=name, axes=axes)

        up_axes = ("experts", "embed", "mlp")
        self.w_gate = experts((num_experts, dim, width), gate_name, up_axes)  # [E, D, F]
        self.w_up = experts((num_experts, dim, width), up_name, up_axes)  # [E, D, F]
        self.w_down = experts((num_experts, width, dim), down_name,
                              ("experts", "mlp", "embed"))  # [E, F, D]
        self.top_k, self.renormalize = top_k, renormalize

    def __call__(self, x):  # [T, D] -> [T, D]
        weights, experts = route(self.gate(x), top_k=self.top_k, renormalize=self.renormalize)
        return grouped_experts(x, weights, experts, self.w_gate[...], self.w_up[...],
                               self.w_down[...])
