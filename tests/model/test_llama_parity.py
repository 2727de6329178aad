"""The Llama family against transformers, through the paged KV cache.

Six ragged prompts (lengths 1 to 100) are prefilled together in one step, their blocks
shuffled and non-contiguous and every unwritten slot of the pool NaN; every prompt token's
logits must match HF's. Then eight one-token decode steps read the context back from the
pool and must match HF's logits at those positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.loading.loader import load_model
from jaxserve.testing.engine_step import engine_step
from pallas_kernels.ragged_paged_attention import kv_pool_shape

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "llama_head_dim")
PROMPT_LENS = (1, 15, 16, 17, 40, 100)
NUM_DECODE = 8
BLOCK_SIZE = 16
NUM_BLOCKS = 48
MAX_BLOCKS = 8  # block-table width: (100 + 8) / 16 rounded up
NUM_SEQS = 8  # the sequence bucket: two padding sequences
PREFILL_TOKENS = 256  # the token bucket of the prefill step (189 real tokens)
DECODE_TOKENS = 8  # the token bucket of a decode step (6 real tokens)
FLOAT32_MAX_ERROR = 1e-4
# bfloat16 rounds weights and activations (HF's own bfloat16 run is ~0.15 off its float32
# logits here, whose range is about +-5): bound the mean error, and the max relative to range.
BFLOAT16_MEAN_ERROR = 5e-2
BFLOAT16_MAX_RELATIVE_ERROR = 0.1


def _sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 256, n + NUM_DECODE, dtype=np.int32) for n in PROMPT_LENS]


def _block_tables() -> list[list[int]]:
    """Each sequence's blocks: drawn from a shuffled pool, so neither sorted nor adjacent."""
    free = list(np.random.default_rng(1).permutation(np.arange(1, NUM_BLOCKS)))
    return [[int(free.pop()) for _ in range(-(-(n + NUM_DECODE) // BLOCK_SIZE))]
            for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_logits(tiny_checkpoint):
    """`hf_logits(name)`: HF float32 logits [len + 8, V] of every sequence, computed once."""
    import torch
    import transformers

    cache = {}

    def get(name: str) -> list[np.ndarray]:
        if name not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                tiny_checkpoint(name), dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                cache[name] = [model(torch.from_numpy(seq[None].astype(np.int64))).logits[0].numpy()
                               for seq in _sequences()]
        return cache[name]

    return get


def _empty_pools(config: ModelConfig):
    """NaN everywhere: any read of a slot this test never wrote poisons the logits."""
    shape = kv_pool_shape(config.num_kv_heads, NUM_BLOCKS, BLOCK_SIZE, config.head_dim)
    return tuple((jnp.full(shape, jnp.nan, config.dtype), jnp.full(shape, jnp.nan, config.dtype))
                 for _ in range(config.num_layers))


# Every family in float32 (the tight bound); bfloat16 for llama alone unless slow.
@pytest.mark.parametrize("name,dtype", [
    pytest.param(name, dtype, marks=() if dtype == "float32" or name == "llama"
                 else pytest.mark.slow)
    for dtype in ("float32", "bfloat16") for name in FAMILIES])
def test_paged_prefill_and_decode_match_transformers(name, dtype, tiny_checkpoint, hf_logits,
                                                     paged_step):
    # float32 means float32 matmuls: GPUs would otherwise use TF32 (errors ~1e-2).
    precision = "highest" if dtype == "float32" else "default"
    with jax.default_matmul_precision(precision):
        _check_parity(name, dtype, tiny_checkpoint, hf_logits, paged_step)


def _check_parity(name, dtype, tiny_checkpoint, hf_logits, paged_step):
    path = tiny_checkpoint(name)
    config = ModelConfig.from_pretrained(path, dtype=dtype)
    model = load_model(path, config)
    sequences, tables, expected = _sequences(), _block_tables(), hf_logits(name)
    layout = dict(block_size=BLOCK_SIZE, num_seqs=NUM_SEQS, max_blocks=MAX_BLOCKS)

    prefill = engine_step(model, all_token_logits=True)
    ids, positions, metadata = paged_step([s[:n] for s, n in zip(sequences, PROMPT_LENS)],
                                          [0] * len(PROMPT_LENS), tables,
                                          num_tokens=PREFILL_TOKENS, **layout)
    logits, kv_caches = prefill(_empty_pools(config), ids, positions, metadata)
    logits = np.asarray(logits)  # [T, V]
    assert logits.shape == (PREFILL_TOKENS, config.vocab_size)
    diffs, ranges = [], []  # |logit error| per compared token, |HF logit| max per token
    for b, n in enumerate(PROMPT_LENS):
        start = metadata.query_start_loc[b]
        diffs.append(np.abs(logits[start:start + n] - expected[b][:n]))
        ranges.append(np.abs(expected[b][:n]).max())

    decode = engine_step(model)
    for step in range(NUM_DECODE):
        done = [n + step for n in PROMPT_LENS]
        ids, positions, metadata = paged_step([s[d:d + 1] for s, d in zip(sequences, done)],
                                              done, tables, num_tokens=DECODE_TOKENS, **layout)
        logits, kv_caches = decode(kv_caches, ids, positions, metadata)
        logits = np.asarray(logits)  # [B, V]
        assert logits.shape == (NUM_SEQS, config.vocab_size)
        diffs += [np.abs(logits[b] - expected[b][d])[None] for b, d in enumerate(done)]
        ranges += [np.abs(expected[b][d]).max() for b, d in enumerate(done)]

    diffs = np.concatenate(diffs)  # [prompt tokens + decoded tokens, V]
    max_error, mean_error = diffs.max(), diffs.mean()
    print(f"{name} {dtype}: max |logit error| {max_error:.2e}, mean {mean_error:.2e}")
    assert np.isfinite(diffs).all()
    if dtype == "float32":
        assert max_error < FLOAT32_MAX_ERROR
    else:
        assert mean_error < BFLOAT16_MEAN_ERROR
        assert max_error < BFLOAT16_MAX_RELATIVE_ERROR * max(ranges)
