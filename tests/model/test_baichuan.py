"""Baichuan / Baichuan2 through the paged KV cache and the engine, against two oracles.

7B style (RoPE): a tiny random transformers Llama, copied into Baichuan's format (q, k, v
fused into W_pack, config.json with model_type "baichuan"); the oracle is that Llama with its
LM head rows L2-normalised, so the un-normalised Baichuan copy needs NormHead to match.
13B style (ALiBi, 6 heads: a non-power-of-two slope set): a numpy forward of the whole model.
Both: logits within 1e-4 in float32 over ragged prefills and decodes (ALiBi also on a TP = 2
mesh), and the oracle's greedy tokens through `LLM.generate` with prefix caching and a
32-token chunked prefill (slow).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.baichuan import BaichuanForCausalLM, alibi_slopes, position_embedding
from jaxserve.model.registry import model_class

FLOAT32_MAX_ERROR = 1e-4
NUM_GREEDY = 12
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128,
              enable_prefix_caching=True, progress=False, background_compilation=False)
# ALiBi model: D = 384, 6 heads of 64 (a head dim the Pallas kernels take).
ALIBI_SHAPE = dict(vocab_size=320, hidden_size=384, num_attention_heads=6,
                   num_hidden_layers=2, intermediate_size=256)
# Slopes of 6 heads, written out: 2^-2, 2^-4, 2^-6, 2^-8 (the 4 of a power of two), then
# 2^-1, 2^-3 (odd powers of 8 heads' base 2^-1).
SIX_HEAD_SLOPES = (2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3)


def _baichuan_config_json(shape: dict, *, position: str, eos: int) -> dict:
    return dict(model_type="baichuan", architectures=["BaichuanForCausalLM"],
                position_embedding=position, norm_head=True, rms_norm_eps=1e-6,
                model_max_length=512, hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=eos, pad_token_id=eos, **shape)


def _save_baichuan(path, tensors: dict, config: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def _unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def rope_checkpoints(tmp_path_factory):
    """(baichuan_dir, llama_oracle_dir): one random model in two formats."""
    import torch
    import transformers

    from jaxserve.testing.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("baichuan-rope")
    tokenizer = save_tokenizer(root / "llama")
    save_tokenizer(root / "baichuan")
    eos = tokenizer.eos_token_id
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4)
    config = transformers.LlamaConfig(**shape, num_key_value_heads=4, rms_norm_eps=1e-6,
                                      max_position_embeddings=512, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else 0.15 * noise)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    tensors = {}
    for name, value in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            prefix = name.removesuffix("q_proj.weight")
            value = np.concatenate([state[f"{prefix}{p}_proj.weight"] for p in "qkv"])
            name = f"{prefix}W_pack.weight"  # [3D, D]: q rows, then k, then v
        tensors[name] = value
    baichuan = _save_baichuan(root / "baichuan", tensors,
                              _baichuan_config_json(shape, position="rope", eos=eos))
    with torch.no_grad():  # the oracle: the same model with NormHead's normalised rows
        model.lm_head.weight.copy_(torch.from_numpy(_unit_rows(state["lm_head.weight"])))
    model.save_pretrained(root / "llama")
    return baichuan, str(root / "llama")


def _alibi_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v, d, f = (ALIBI_SHAPE[k] for k in ("vocab_size", "hidden_size", "intermediate_size"))
    scale = 1.2 / np.sqrt(d)  # attention far from uniform, activations of order one

    def normal(*shape, std=scale):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, d, std=1.0),
         "model.norm.weight": 1.0 + normal(d, std=0.3),
         "lm_head.weight": normal(v, d, std=0.5)}  # un-normalised: NormHead must do it
    for i in range(ALIBI_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = 1.0 + normal(d, std=0.3)
        w[f"{p}.post_attention_layernorm.weight"] = 1.0 + normal(d, std=0.3)
        w[f"{p}.self_attn.W_pack.weight"] = normal(3 * d, d)
        w[f"{p}.self_attn.o_proj.weight"] = normal(d, d)
        w[f"{p}.mlp.gate_proj.weight"] = normal(f, d)
        w[f"{p}.mlp.up_proj.weight"] = normal(f, d)
        w[f"{p}.mlp.down_proj.weight"] = normal(d, f, std=1.2 / np.sqrt(f))
    return w


@pytest.fixture(scope="module")
def alibi_checkpoint(tmp_path_factory):
    """(baichuan_dir, weights): a 13B-style ALiBi model and its float32 tensors."""
    from jaxserve.testing.tokenizer import save_tokenizer

    path = tmp_path_factory.mktemp("baichuan-alibi")
    tokenizer = save_tokenizer(path)
    assert len(tokenizer) <= ALIBI_SHAPE["vocab_size"]
    weights = _alibi_weights()
    _save_baichuan(path, weights, _baichuan_config_json(
        ALIBI_SHAPE, position="alibi", eos=tokenizer.eos_token_id))
    return str(path), weights


def _rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def numpy_alibi_logits(w: dict[str, np.ndarray], tokens) -> np.ndarray:  # [S] -> [S, V]
    """The whole ALiBi model in float64: causal attention with slope * (key - query)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    num_heads, dim = ALIBI_SHAPE["num_attention_heads"], ALIBI_SHAPE["hidden_size"]
    head_dim, seq = dim // num_heads, len(tokens)
    pos = np.arange(seq)
    bias = np.asarray(SIX_HEAD_SLOPES)[:, None, None] * (pos[None, None, :] - pos[None, :, None])
    causal = pos[None, :] <= pos[:, None]  # [S query, S key]
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]  # [S, D]
    for i in range(ALIBI_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, w[f"{p}.input_layernorm.weight"])
        q, k, v = np.split(h @ w[f"{p}.self_attn.W_pack.weight"].T, 3, axis=-1)
        q, k, v = (t.reshape(seq, num_heads, head_dim) for t in (q, k, v))
        s = np.einsum("snh,tnh->nst", q, k) / np.sqrt(head_dim) + bias  # [N, S, S]
        s = np.where(causal[None], s, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        out = np.einsum("nst,tnh->snh", prob, v).reshape(seq, dim)
        x = x + out @ w[f"{p}.self_attn.o_proj.weight"].T
        h = _rms(x, w[f"{p}.post_attention_layernorm.weight"])
        gate, up = h @ w[f"{p}.mlp.gate_proj.weight"].T, h @ w[f"{p}.mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}.mlp.down_proj.weight"].T
    return _rms(x, w["model.norm.weight"]) @ _unit_rows(w["lm_head.weight"]).T


def numpy_alibi_greedy(w, prompts, max_tokens: int) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(max_tokens):
            tokens.append(int(np.argmax(numpy_alibi_logits(w, tokens)[-1])))
        outputs.append(tokens[len(prompt):])
    return outputs


def _engine_prompts(vocab: int) -> list[list[int]]:
    from jaxserve.testing.hf_reference import random_prompts

    prefix = random_prompts([40], seed=1, vocab=vocab)[0]
    prompts = [prefix + tail for tail in random_prompts([1, 9, 20], seed=2, vocab=vocab)]
    return prompts + random_prompts([5, 50], seed=3, vocab=vocab)


def _engine_tokens(path, prompts, **kwargs) -> tuple[list[list[int]], dict]:
    from jaxserve import LLM, SamplingParams

    llm = LLM(path, **{**ENGINE, **kwargs})
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_GREEDY, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.get_metrics()


def test_alibi_slopes_follow_bloom_for_powers_of_two_and_others():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(6), SIX_HEAD_SLOPES, rtol=1e-7)
    # 40 heads (Baichuan2-13B): 32 of base 2^-1/4, then 8 odd powers of 2^-1/8.
    want = np.concatenate([2.0 ** (-0.25 * np.arange(1, 33)),
                           2.0 ** (-0.125 * np.arange(1, 16, 2))])
    np.testing.assert_allclose(alibi_slopes(40), want, rtol=1e-6)


def test_baichuan_config_reads_without_remote_code(alibi_checkpoint):
    config = ModelConfig.from_pretrained(alibi_checkpoint[0], dtype="float32")
    assert config.architecture == "BaichuanForCausalLM"
    assert model_class(config.architecture) is BaichuanForCausalLM
    assert model_class("BaiChuanForCausalLM") is BaichuanForCausalLM
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (6, 6, 64)
    assert config.max_position_embeddings == 512  # from model_max_length
    assert not config.tie_word_embeddings
    assert position_embedding(config) == "alibi"


@pytest.mark.parametrize("hidden_size,expected", [(4096, "rope"), (5120, "alibi")])
def test_position_embedding_without_the_key_follows_the_hidden_size(alibi_checkpoint,
                                                                    hidden_size, expected):
    import transformers

    config = ModelConfig.from_pretrained(alibi_checkpoint[0], dtype="float32")
    bare = dataclasses.replace(config, hidden_size=hidden_size,
                               hf_config=transformers.PretrainedConfig())
    assert position_embedding(bare) == expected


def test_rope_paged_logits_match_transformers_llama_with_a_normalised_head(
        rope_checkpoints, paged_parity):
    baichuan, oracle = rope_checkpoints
    sequences = paged_parity.sequences(320)
    diffs = paged_parity.errors(baichuan, sequences, paged_parity.hf_logits(oracle, sequences))
    print(f"baichuan rope float32: max |logit error| {diffs.max():.2e}")
    assert np.isfinite(diffs).all() and diffs.max() < FLOAT32_MAX_ERROR


def test_alibi_paged_logits_match_a_numpy_model(alibi_checkpoint, paged_parity):
    path, weights = alibi_checkpoint
    sequences = paged_parity.sequences(ALIBI_SHAPE["vocab_size"])
    expected = [numpy_alibi_logits(weights, s) for s in sequences]
    diffs = paged_parity.errors(path, sequences, expected)
    print(f"baichuan alibi float32: max |logit error| {diffs.max():.2e}")
    assert np.isfinite(diffs).all() and diffs.max() < FLOAT32_MAX_ERROR


# The engine runs below are slow: the default run has both models' paged logits (above and
# the TP = 2 prefill below), and the engine's caching and chunking for qwen2, Qwen2-MoE and
# DeepSeek-V2 (tests/engine, tests/model/test_moe.py, tests/model/test_deepseek_v2.py).
@pytest.mark.slow
def test_rope_greedy_tokens_equal_transformers_with_caching_and_chunking(rope_checkpoints):
    from jaxserve.testing.hf_reference import hf_greedy

    baichuan, oracle = rope_checkpoints
    prompts = _engine_prompts(320)
    tokens, metrics = _engine_tokens(baichuan, prompts)
    assert tokens == hf_greedy(oracle, prompts, NUM_GREEDY)
    assert metrics["prefix_cache_hits"] > 0


@pytest.fixture(scope="module")
def alibi_greedy(alibi_checkpoint):
    """(prompts, the numpy model's greedy tokens)."""
    prompts = _engine_prompts(ALIBI_SHAPE["vocab_size"])
    return prompts, numpy_alibi_greedy(alibi_checkpoint[1], prompts, NUM_GREEDY)


@pytest.mark.slow
def test_alibi_greedy_tokens_equal_numpy_with_caching_and_chunking(alibi_checkpoint,
                                                                   alibi_greedy):
    prompts, expected = alibi_greedy
    tokens, metrics = _engine_tokens(alibi_checkpoint[0], prompts)
    assert tokens == expected
    assert metrics["prefix_cache_hits"] > 0


# Also slow: the default run has ALiBi in both Pallas kernels (tests/pallas_kernels) and the
# Pallas backend through the engine (tests/engine/test_attention_backends.py).
@pytest.mark.slow
def test_alibi_greedy_tokens_equal_numpy_on_the_pallas_backend(alibi_checkpoint,
                                                               alibi_greedy):
    prompts, expected = alibi_greedy
    tokens, _ = _engine_tokens(alibi_checkpoint[0], prompts, attention_backend="pallas")
    assert tokens == expected


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")
def test_alibi_prefill_logits_with_tensor_parallel_2_match_the_numpy_model(alibi_checkpoint,
                                                                           paged_step):
    """One ragged prefill on a TP = 2 mesh, under `jax.set_mesh` as the engine runs it: each
    rank attends with 3 of the 6 heads and must take their slopes."""

    from jaxserve.model.loading.loader import load_model
    from jaxserve.testing.engine_step import engine_step
    from jaxserve.parallel.sharding import kv_pool_sharding, make_mesh
    from pallas_kernels.ragged_paged_attention import kv_pool_shape

    path, weights = alibi_checkpoint
    config, mesh = ModelConfig.from_pretrained(path, dtype="float32"), make_mesh(tp=2)
    tokens = [list(range(3, 40)), list(range(50, 60))]
    inputs = paged_step(tokens, [0, 0], [[3, 1, 5], [2]], block_size=16, num_tokens=64,
                        num_seqs=2, max_blocks=4)  # (ids [T], positions [T], metadata)
    shape = kv_pool_shape(config.num_kv_heads, 8, 16, config.head_dim)
    pools = tuple(tuple(jax.device_put(np.zeros(shape, np.float32),
                                       kv_pool_sharding(shape, mesh)) for _ in "kv")
                  for _ in range(config.num_layers))
    model = load_model(path, config, mesh=mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        logits, _ = engine_step(model, all_token_logits=True, mesh=mesh)(
            pools, *jax.device_put(inputs, replicated))
    logits, starts = np.asarray(logits), inputs[2].query_start_loc  # [T, V], [B + 1]
    for b, sequence in enumerate(tokens):
        np.testing.assert_allclose(logits[starts[b]:starts[b] + len(sequence)],
                                   numpy_alibi_logits(weights, sequence),
                                   atol=FLOAT32_MAX_ERROR)


# Slow: the default run has the TP = 2 prefill above.
@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")
def test_alibi_greedy_tokens_equal_numpy_with_tensor_parallel_2(alibi_checkpoint,
                                                                alibi_greedy):
    prompts, expected = alibi_greedy  # each rank holds 3 heads and must take their slopes
    tokens, _ = _engine_tokens(alibi_checkpoint[0], prompts, tensor_parallel_size=2)
    assert tokens == expected
