"""Expert parallelism: MoE experts split over the "model" axis give TP = 1's tokens.

With `enable_expert_parallel` each of TP ranks holds E / TP whole experts; without it
every rank holds all E experts with 1/TP of their MLP width. Either way the grouped matmuls
run per rank under shard_map and one psum sums the ranks. Tiny Mixtral (4 experts, top-2)
and Qwen2-MoE (4 experts, top-2, gated shared expert, one dense layer) on 8 CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM, SamplingParams
from jaxserve.model.moe import SharedExpert, SparseMoE
from jaxserve.model.ops import Ops
from jaxserve.testing.metadata import one_sequence
from jaxserve.parallel.expert_parallel import sharding_rules
from jaxserve.parallel.sharding import logical_sharding, make_mesh
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# 7 blocks of 16 tokens for 6 prompts of up to 54 tokens force preemption; one T bucket.
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=16, num_gpu_blocks_override=7,
              max_model_len=80, enable_prefix_caching=True, progress=False,
              skip_tokenizer_init=True, background_compilation=False)
FAMILIES = ("mixtral", "qwen2_moe")
LAYOUTS = ((2, False), (2, True), (4, False), (4, True))  # (TP, expert parallel)


def _moe_block(expert_parallel: bool) -> SparseMoE:
    rngs = nnx.Rngs(0)
    shared = SharedExpert(32, 40, hf_name="s", gate_name="sg", dtype=jnp.float32, ops=Ops(),
                          rngs=rngs)
    moe = SparseMoE(32, 48, num_experts=4, top_k=2, renormalize=False, router_name="r",
                    expert_names=("g{expert}", "u{expert}", "d{expert}"), dtype=jnp.float32,
                    ops=Ops(), rngs=rngs, shared_expert=shared,
                    expert_parallel=expert_parallel)
    moe.gate.kernel[...] = moe.gate.kernel[...] * 50  # routing far from uniform
    return moe


# Default: the width split (TP = 2), the expert split (TP = 4) and its fallback to the width
# (TP = 8 > E = 4); the two other layouts are slow.
@needs_8_devices
@pytest.mark.parametrize("tp,expert_parallel", [
    pytest.param(tp, ep, marks=pytest.mark.slow if (tp, ep) in ((2, True), (4, False)) else ())
    for tp, ep in LAYOUTS + ((8, True),)])
def test_sharded_moe_block_equals_one_device_and_gathers_nothing(tp, expert_parallel):
    moe = _moe_block(expert_parallel)
    x = np.random.default_rng(0).normal(size=(37, 32)).astype(np.float32)  # [T, D]
    graphdef, state = nnx.split(moe)
    step = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v, one_sequence(v.shape[0])))
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(step(state, x))
    mesh, rules = make_mesh(tp), sharding_rules(expert_parallel=expert_parallel)
    placed = jax.tree.map(
        lambda v: v.replace(jax.device_put(v[...], logical_sharding(
            v.get_metadata()["axes"], v.shape, mesh, rules=rules))),
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    x = jax.device_put(x, logical_sharding((None, None), x.shape, mesh))
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        out = np.asarray(step(placed, x))
        hlo = step.lower(placed, x).compile().as_text()
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert "all-gather" not in hlo  # each rank computes with the weights it holds


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([30], seed=5, vocab=256)[0]  # a cached prefix for half
    tails = random_prompts([1, 9, 17, 24, 5, 13], seed=6, vocab=256)
    return [shared + t if i % 2 else t + shared[:8] for i, t in enumerate(tails)]


def _generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# Qwen2-MoE (shared expert, a dense layer) through the engines in the default run; Mixtral's
# are slow (the MoE block test above covers both ways of splitting in the default run).
@pytest.fixture(scope="module", params=[pytest.param("mixtral", marks=pytest.mark.slow),
                                        "qwen2_moe"])
def engines(request, tiny_checkpoint):
    """`engines[tp, expert_parallel]`: that layout's engine, built on first use."""
    path = str(tiny_checkpoint(request.param))

    class Engines(dict):
        def __missing__(self, layout):
            tp, ep = layout
            self[layout] = LLM(path, tensor_parallel_size=tp, enable_expert_parallel=ep,
                               **ENGINE)
            return self[layout]

    return Engines()


# The engine layouts: the expert split at TP = 4 in the default run, the other three slow
# (the MoE block test above splits both ways in the default run).
ENGINE_LAYOUTS = [pytest.param(tp, ep, marks=() if (tp, ep) == (4, True) else pytest.mark.slow)
                  for tp, ep in LAYOUTS]


def _moe(engine):
    """Layer 0's MoE params."""
    layer = engine.llm_engine.runner.params["layers"][0]
    return layer["mlp"]


def _shard_shape(array):
    return array.addressable_shards[0].data.shape


@needs_8_devices
@pytest.mark.parametrize("tp,ep", ENGINE_LAYOUTS)
def test_greedy_tokens_equal_tp1_with_and_without_expert_parallel(engines, prompts, tp, ep):
    expected, llm = _generate(engines[1, False], prompts), engines[tp, ep]
    with forbid_compilation():
        assert _generate(llm, prompts) == expected
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0
    assert metrics["prefix_cache_hits"] > 0


@needs_8_devices
@pytest.mark.parametrize("tp,ep", ENGINE_LAYOUTS)
def test_expert_stacks_split_on_experts_with_expert_parallel_else_on_width(engines, tp, ep):
    num_experts, dim, width = _moe(engines[1, False])["w_gate"][...].shape
    moe = _moe(engines[tp, ep])
    w_gate, w_down = moe["w_gate"][...], moe["w_down"][...]
    if ep:
        assert _shard_shape(w_gate) == (num_experts // tp, dim, width)
        assert _shard_shape(w_down) == (num_experts // tp, width, dim)
    else:
        assert _shard_shape(w_gate) == (num_experts, dim, width // tp)
        assert _shard_shape(w_down) == (num_experts, width // tp, dim)
    assert len(w_gate.sharding.device_set) == tp
    # the router stays whole on every rank
    assert _shard_shape(moe["gate"]["kernel"][...]) == (dim, num_experts)
