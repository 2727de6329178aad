"""The sparse MoE block and Mixtral: against a dense loop, transformers' logits, HF greedy.

The ragged_dot MoE must equal running every token through its chosen experts one by one.
A tiny Mixtral (4 experts, top-2) prefills ragged prompts on shuffled blocks and decodes
through the paged pool within 1e-4 of HF's float32 logits; `LLM.generate` with prefix
caching, 32-token chunked prefill and a pool small enough to preempt gives HF's greedy tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.forward import make_forward
from jaxserve.model.loader import load_model
from jaxserve.model.moe import SparseMoE
from pallas_kernels.ragged_paged_attention import kv_pool_shape

PROMPT_LENS = (1, 15, 17, 40)
NUM_DECODE = 4
BLOCK_SIZE = 16
NUM_BLOCKS = 24
MAX_BLOCKS = 4  # block-table width: (40 + 4) / 16 rounded up
NUM_SEQS = 8  # the sequence bucket: four padding sequences
PREFILL_TOKENS = 128  # the token bucket of the prefill step (73 real tokens)
DECODE_TOKENS = 8
FLOAT32_MAX_ERROR = 1e-4


def _dense_moe(moe: SparseMoE, x: np.ndarray) -> np.ndarray:
    """The reference: each token through each of its top-k experts, one at a time."""
    router, w_gate, w_up, w_down = (np.asarray(p[...], np.float64) for p in
                                    (moe.gate.kernel, moe.w_gate, moe.w_up, moe.w_down))
    logits = x @ router  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t])[:moe.top_k]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if moe.renormalize else 1.0)
        for e, w in zip(chosen, weights):
            gate, up = x[t] @ w_gate[e], x[t] @ w_up[e]  # [F]
            out[t] += w * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_ragged_dot_moe_equals_a_dense_per_expert_loop(renormalize):
    moe = SparseMoE(32, 48, num_experts=6, top_k=2, renormalize=renormalize,
                    router_name="gate", expert_names=("g.{expert}", "u.{expert}", "d.{expert}"),
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
    moe.gate.kernel[...] = moe.gate.kernel[...] * 50  # routing far from uniform
    x = np.random.default_rng(0).normal(size=(37, 32)).astype(np.float32)  # [T, D]
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda m, v: m(v))(moe, x))
    np.testing.assert_allclose(out, _dense_moe(moe, x.astype(np.float64)), atol=1e-5, rtol=1e-4)


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 256, n + NUM_DECODE, dtype=np.int32) for n in PROMPT_LENS]


def _hf_logits(path) -> list[np.ndarray]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model(torch.from_numpy(seq[None].astype(np.int64))).logits[0].numpy()
                for seq in _sequences()]


def test_mixtral_paged_prefill_and_decode_match_transformers(tiny_checkpoint, paged_step):
    path = tiny_checkpoint("mixtral")
    config = ModelConfig.from_pretrained(path, dtype="float32")
    graphdef, params = nnx.split(load_model(path, config))
    sequences, expected = _sequences(), _hf_logits(path)
    free = list(np.random.default_rng(1).permutation(np.arange(1, NUM_BLOCKS)))
    tables = [[int(free.pop()) for _ in range(-(-(n + NUM_DECODE) // BLOCK_SIZE))]
              for n in PROMPT_LENS]
    layout = dict(block_size=BLOCK_SIZE, num_seqs=NUM_SEQS, max_blocks=MAX_BLOCKS)
    shape = kv_pool_shape(config.num_kv_heads, NUM_BLOCKS, BLOCK_SIZE, config.head_dim)
    kv_caches = tuple((jnp.full(shape, jnp.nan), jnp.full(shape, jnp.nan))
                      for _ in range(config.num_layers))  # NaN: unwritten slots poison
    diffs = []
    with jax.default_matmul_precision("highest"):
        ids, positions, metadata = paged_step([s[:n] for s, n in zip(sequences, PROMPT_LENS)],
                                              [0] * len(PROMPT_LENS), tables,
                                              num_tokens=PREFILL_TOKENS, **layout)
        logits, kv_caches = make_forward(graphdef, all_token_logits=True)(
            params, kv_caches, ids, positions, metadata)
        for b, n in enumerate(PROMPT_LENS):
            start = metadata.query_start_loc[b]
            diffs.append(np.abs(np.asarray(logits)[start:start + n] - expected[b][:n]))
        decode = make_forward(graphdef)
        for step in range(NUM_DECODE):
            done = [n + step for n in PROMPT_LENS]
            ids, positions, metadata = paged_step([s[d:d + 1] for s, d in zip(sequences, done)],
                                                  done, tables, num_tokens=DECODE_TOKENS,
                                                  **layout)
            logits, kv_caches = decode(params, kv_caches, ids, positions, metadata)
            diffs += [np.abs(np.asarray(logits)[b] - expected[b][d])[None]
                      for b, d in enumerate(done)]
    diffs = np.concatenate(diffs)  # [prompt tokens + decoded tokens, V]
    print(f"mixtral float32: max |logit error| {diffs.max():.2e}, mean {diffs.mean():.2e}")
    assert np.isfinite(diffs).all() and diffs.max() < FLOAT32_MAX_ERROR


def test_mixtral_greedy_tokens_equal_transformers_with_caching_chunking_and_preemption(
        engine_checkpoint, engine_kwargs):
    from jaxserve import LLM, SamplingParams
    from jaxserve.testing.hf_reference import hf_greedy, random_prompts

    path = engine_checkpoint("mixtral")
    prefix = random_prompts([40], seed=1)[0]
    prompts = [prefix + tail for tail in random_prompts([1, 9, 20, 33], seed=2)]
    prompts += random_prompts([5, 50], seed=3)
    llm = LLM(str(path), **{**engine_kwargs, "max_num_batched_tokens": 32,
                            "num_gpu_blocks_override": 12, "max_num_seqs": 8,
                            "max_model_len": 128})
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 16)
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0
    assert metrics["prefix_cache_hits"] > 0
