"""DeepSeek-V2: MLA over a latent pool and DeepSeekMoE, against transformers.

Two tiny checkpoints: "deepseek_v2" (q LoRA, YaRN with mscale, group-limited routing with a
scaling factor, two shared experts) and "deepseek_v2_lite" (V2-Lite's shape: no q LoRA,
greedy routing, plain RoPE); both have a dense first layer. Ragged prompts prefill together
on shuffled blocks of NaN-poisoned latent pools, then decode, within 1e-4 of HF's float32
logits; `LLM.generate` with prefix caching, chunked prefill and preemption gives HF's
greedy tokens. The pool holds C + Hr values per token per layer, not K/V heads.
"""

import numpy as np
import pytest

from jaxserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxserve.runner.kv_cache import bytes_per_block, layer_pool_shapes

BLOCK_SIZE = 16
NUM_BLOCKS = 24
FLOAT32_MAX_ERROR = 1e-4
FAMILIES = ("deepseek_v2", "deepseek_v2_lite")


@pytest.mark.parametrize("family", FAMILIES)
def test_deepseek_v2_paged_prefill_and_decode_match_transformers(family, tiny_checkpoint,
                                                                 paged_parity):
    path = tiny_checkpoint(family)
    sequences = paged_parity.sequences()
    diffs = paged_parity.errors(path, sequences, paged_parity.hf_logits(path, sequences))
    print(f"{family} float32: max |logit error| {diffs.max():.2e}")
    assert np.isfinite(diffs).all() and diffs.max() < FLOAT32_MAX_ERROR


def test_the_pool_stores_one_latent_row_per_token(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("deepseek_v2"), dtype="bfloat16")
    assert config.kv_latent_dim == 32 + 8  # kv_lora_rank + qk_rope_head_dim
    assert layer_pool_shapes(config, NUM_BLOCKS, BLOCK_SIZE) == ((NUM_BLOCKS, BLOCK_SIZE, 40),)
    # 3 layers x 16 tokens x 40 values x 2 bytes, the same on every device under TP
    assert bytes_per_block(config, BLOCK_SIZE) == 3 * 16 * 40 * 2
    assert bytes_per_block(config, BLOCK_SIZE, num_shards=4) == 3 * 16 * 40 * 2


def test_an_mla_model_refuses_an_8_bit_kv_cache(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("deepseek_v2"), dtype="float32")
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' for an MLA model"):
        EngineConfig(config, CacheConfig(kv_cache_dtype="fp8"),
                     SchedulerConfig(max_model_len=config.max_model_len),
                     attention_backend="reference")


# V2 (q LoRA, YaRN, group-limited routing) through the engine; V2-Lite's engine run is slow
# (its paged logits above stay in the default run).
@pytest.mark.parametrize("family", [FAMILIES[0], pytest.param(FAMILIES[1], marks=pytest.mark.slow)])
def test_deepseek_v2_greedy_tokens_equal_transformers_with_caching_chunking_and_preemption(
        family, assert_greedy_parity):
    assert_greedy_parity(family)


# Public config.json values of the two released models (attention shapes only matter here).
RELEASED = {
    "DeepSeek-V2-Lite": dict(hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                             q_lora_rank=None, n_routed_experts=64, n_group=1, topk_group=1),
    "DeepSeek-V2": dict(hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
                        q_lora_rank=1536, n_routed_experts=160, n_group=8, topk_group=3),
}


@pytest.mark.parametrize("name,latent_bytes,per_head_bytes", [
    ("DeepSeek-V2-Lite", 31_104, 276_480), ("DeepSeek-V2", 69_120, 4_915_200)])
def test_kv_bytes_per_token_of_the_released_models(name, latent_bytes, per_head_bytes,
                                                   tmp_path):
    import transformers

    hf = transformers.DeepseekV2Config(
        **RELEASED[name], num_key_value_heads=RELEASED[name]["num_attention_heads"],
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        vocab_size=102400, max_position_embeddings=163840, architectures=[
            "DeepseekV2ForCausalLM"], rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=40.0,
            original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707,
            beta_fast=32, beta_slow=1))
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_pretrained(tmp_path, dtype="bfloat16", max_model_len=4096)
    per_token = bytes_per_block(config, BLOCK_SIZE) // BLOCK_SIZE
    # A per-head layout would keep N keys of nope + rope and N values of v_head_dim.
    per_head = config.num_layers * config.num_heads * (128 + 64 + 128) * 2
    print(f"{name}: {per_token} B/token latent vs {per_head} B/token per-head K/V "
          f"({per_head / per_token:.1f}x)")
    assert (per_token, per_head) == (latent_bytes, per_head_bytes)
