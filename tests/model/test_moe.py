"""The sparse MoE block, Mixtral and Qwen2-MoE: against a dense loop, transformers' logits,
HF greedy.

The ragged_dot MoE must equal running every token through its chosen experts one by one,
with DeepSeek-V2's group-limited routing, a routed scaling factor and shared experts too.
A tiny Mixtral (4 experts, top-2) and a tiny Qwen2-MoE (4 experts, top-2, gated shared
expert, one dense layer) prefill ragged prompts on shuffled blocks and decode through the
paged pool within 1e-4 of HF's float32 logits; `LLM.generate` with prefix caching, 32-token
chunked prefill and a pool small enough to preempt gives HF's greedy tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.model.moe import SharedExpert, SparseMoE
from jaxserve.model.ops import Ops
from jaxserve.testing.metadata import one_sequence

FLOAT32_MAX_ERROR = 1e-4


def _silu_mlp(x, w_gate, w_up, w_down):  # [D] or [T, D], float64
    gate, up = x @ w_gate, x @ w_up  # [..., F]
    return (gate / (1 + np.exp(-gate)) * up) @ w_down


def _dense_moe(moe: SparseMoE, x: np.ndarray) -> np.ndarray:
    """The reference: each token through each of its top-k experts, one at a time; groups
    ranked by their best expert, the other groups' experts ineligible; then the shared one."""
    router, w_gate, w_up, w_down = (np.asarray(p[...], np.float64) for p in
                                    (moe.gate.kernel, moe.w_gate, moe.w_up, moe.w_down))
    logits = x @ router  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    group_size = probs.shape[1] // moe.num_groups
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        groups = np.argsort(-probs[t].reshape(moe.num_groups, group_size).max(-1))
        eligible = [e for e in range(probs.shape[1])
                    if e // group_size in groups[:moe.topk_groups]]
        chosen = sorted(eligible, key=lambda e: -probs[t, e])[:moe.top_k]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if moe.renormalize else 1.0)
        for e, w in zip(chosen, weights * moe.scaling_factor):
            out[t] += w * _silu_mlp(x[t], w_gate[e], w_up[e], w_down[e])
    shared = moe.shared_expert
    if shared is not None:
        mlp = [np.asarray(p.kernel[...], np.float64)
               for p in (shared.mlp.gate_proj, shared.mlp.up_proj, shared.mlp.down_proj)]
        scale = (1.0 if shared.gate is None else
                 1 / (1 + np.exp(-(x @ np.asarray(shared.gate.kernel[...], np.float64)))))
        out += scale * _silu_mlp(x, *mlp)
    return out


# (num_groups, topk_groups, scaling_factor, shared expert gated?): Mixtral-like, Qwen2-MoE
# (gated shared expert), DeepSeek-V2 (group-limited greedy, scaled, plain shared experts).
ROUTINGS = {"plain": (1, 1, 1.0, None), "qwen2_moe": (1, 1, 1.0, True),
            "deepseek_v2": (3, 2, 2.5, False)}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("renormalize", [True, False])
def test_ragged_dot_moe_equals_a_dense_per_expert_loop(renormalize, routing):
    num_groups, topk_groups, scaling, gated = ROUTINGS[routing]
    rngs = nnx.Rngs(0)
    shared = None if gated is None else SharedExpert(
        32, 40, hf_name="shared", gate_name="shared_gate" if gated else None,
        dtype=jnp.float32, ops=Ops(), rngs=rngs)
    moe = SparseMoE(32, 48, num_experts=6, top_k=3, renormalize=renormalize,
                    router_name="gate", expert_names=("g.{expert}", "u.{expert}", "d.{expert}"),
                    dtype=jnp.float32, ops=Ops(), rngs=rngs, num_groups=num_groups,
                    topk_groups=topk_groups, scaling_factor=scaling, shared_expert=shared)
    moe.gate.kernel[...] = moe.gate.kernel[...] * 50  # routing far from uniform
    x = np.random.default_rng(0).normal(size=(37, 32)).astype(np.float32)  # [T, D]
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda m, v: m(v, one_sequence(len(x))))(moe, x))
    np.testing.assert_allclose(out, _dense_moe(moe, x.astype(np.float64)), atol=1e-5, rtol=1e-4)


def test_group_limited_routing_picks_only_from_the_best_groups():
    from jaxserve.model.moe import route

    # 3 groups of 2; group bests 0.30, 0.25, 0.20 -> groups 0 and 1 kept, expert 5 (0.19)
    # loses to expert 3 (0.06) although its own score is higher.
    probs = np.array([[0.30, 0.05, 0.25, 0.06, 0.15, 0.19]])
    weights, experts = route(jnp.log(probs), top_k=3, num_groups=3, topk_groups=2,
                             scaling_factor=2.0)
    assert sorted(np.asarray(experts)[0].tolist()) == [0, 2, 3]
    np.testing.assert_allclose(np.sort(np.asarray(weights)[0]), [0.12, 0.5, 0.6], rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_paged_prefill_and_decode_match_transformers(tiny_checkpoint, paged_parity, family):
    path = tiny_checkpoint(family)
    sequences = paged_parity.sequences()
    diffs = paged_parity.errors(path, sequences, paged_parity.hf_logits(path, sequences))
    print(f"{family} float32: max |logit error| {diffs.max():.2e}, mean {diffs.mean():.2e}")
    assert np.isfinite(diffs).all() and diffs.max() < FLOAT32_MAX_ERROR


# Qwen2-MoE (shared expert, a dense layer) through the engine; Mixtral's engine run is slow
# (its paged logits above stay in the default run).
@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen2_moe"])
def test_moe_greedy_tokens_equal_transformers_with_caching_chunking_and_preemption(
        family, assert_greedy_parity):
    assert_greedy_parity(family)
