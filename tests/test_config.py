"""ModelConfig: read once from an HF directory, normalized, validated with the field named."""

import dataclasses
import json
import subprocess
import sys

import pytest

from jaxserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


def _write_config(path, **overrides):
    """A minimal Llama config.json (transformers 4 style: top-level rope_theta)."""
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, eos_token_id=2, bos_token_id=1)
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_llama_checkpoint_fields(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("llama"), dtype="float32")
    assert (config.architecture, config.vocab_size, config.hidden_size, config.num_layers,
            config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size) == ("LlamaForCausalLM", 256, 64, 2, 4, 2, 16, 128)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 10000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}
    assert not config.tie_word_embeddings and not config.attention_bias and not config.qk_norm
    assert config.sliding_window is None and config.layer_sliding_windows == (None, None)
    assert config.max_model_len == config.max_position_embeddings == 256
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.hf_config.model_type == "llama"


def test_qwen2_has_qkv_bias_but_no_output_bias_and_tied_embeddings(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("qwen2"), dtype="float32")
    assert config.attention_bias and not config.o_proj_bias and config.tie_word_embeddings
    assert config.rope_scaling["rope_type"] == "yarn" and config.rope_scaling["factor"] == 4.0


def test_qwen3_has_qk_norm_and_its_own_head_dim(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("qwen3"), dtype="float32")
    assert config.qk_norm and config.head_dim == 32 != config.hidden_size // config.num_heads
    assert config.rope_scaling is None and config.rope_theta == 1e6


def test_mistral_windows_every_layer(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("mistral"), dtype="float32")
    assert config.sliding_window == 24 and config.layer_sliding_windows == (24, 24)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_legacy_rope_scaling_matches_rope_parameters(tmp_path):
    legacy, modern = tmp_path / "legacy", tmp_path / "modern"
    legacy.mkdir(), modern.mkdir()
    _write_config(legacy, rope_theta=500000.0, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    _write_config(modern, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
        "original_max_position_embeddings": 64})
    a, b = (ModelConfig.from_pretrained(p, dtype="float32") for p in (legacy, modern))
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling == b.rope_scaling
    assert a.rope_scaling["rope_type"] == "yarn" and "type" not in a.rope_scaling


def test_qwen2_sliding_window_applies_only_when_enabled_and_from_max_window_layers(tmp_path):
    base = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=32)
    off = ModelConfig.from_pretrained(_write_config(tmp_path, **base, use_sliding_window=False),
                                      dtype="float32")
    assert off.sliding_window is None and off.layer_sliding_windows == (None, None)
    on = ModelConfig.from_pretrained(_write_config(tmp_path, **base, use_sliding_window=True,
                                                   max_window_layers=1), dtype="float32")
    assert on.sliding_window == 32 and on.layer_sliding_windows == (None, 32)


@pytest.mark.parametrize("platform, expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                                ("tpu", "bfloat16")])
def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(tmp_path, platform, expected):
    assert ModelConfig.from_pretrained(_write_config(tmp_path), platform=platform).dtype == expected


def test_explicit_dtype_is_kept_and_an_unknown_one_names_the_field(tmp_path):
    _write_config(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path, dtype="float16").dtype == "float16"
    with pytest.raises(ValueError, match="ModelConfig.dtype"):
        ModelConfig.from_pretrained(tmp_path, dtype="int8")


def test_max_model_len_defaults_to_the_checkpoint_and_may_not_exceed_it(tmp_path):
    _write_config(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path, dtype="float32", max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match=r"ModelConfig.max_model_len must be <= max_position_embeddings=256"):
        ModelConfig.from_pretrained(tmp_path, dtype="float32", max_model_len=257)


def test_unsupported_rope_type_names_rope_scaling(tmp_path):
    _write_config(tmp_path, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="ModelConfig.rope_scaling"):
        ModelConfig.from_pretrained(tmp_path, dtype="float32")


def test_missing_config_json_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_generation_config_adds_eos_ids(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelConfig.from_pretrained(tmp_path, dtype="float32").eos_token_ids == (2, 7)


def test_config_is_frozen_and_validated_with_the_field_named(tmp_path):
    config = ModelConfig.from_pretrained(_write_config(tmp_path), dtype="float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3
    with pytest.raises(ValueError, match="ModelConfig.num_kv_heads must be a divisor"):
        dataclasses.replace(config, num_kv_heads=3)
    with pytest.raises(ValueError, match="ModelConfig.head_dim"):
        dataclasses.replace(config, head_dim=15)
    with pytest.raises(ValueError, match="ModelConfig.layer_sliding_windows"):
        dataclasses.replace(config, layer_sliding_windows=(None,))
    assert hash(config) == hash(dataclasses.replace(config))


def test_importing_config_pulls_in_neither_jax_nor_transformers():
    code = ("import sys, jaxserve.config; "
            "print(sorted(m for m in ('jax', 'transformers', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_a_directory_of_several_gguf_files_is_ambiguous_and_names_them(tmp_path):
    for name in ("model-Q4_1.gguf", "model-Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 .gguf files \(model-Q4_1.gguf, model-Q8_0.gguf\); "
                                         r"pass the path of the one to serve"):
        ModelConfig.from_pretrained(tmp_path)


def test_a_file_that_is_not_gguf_is_no_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config.json \(nor a .gguf file\)"):
        ModelConfig.from_pretrained(tmp_path / "model.safetensors")


def test_engine_config_holds_expert_parallel_beside_tp_and_builds_the_model_with_it(tmp_path):
    model = ModelConfig.from_pretrained(_write_config(tmp_path), dtype="float32")
    parts = dict(model_config=model, cache_config=CacheConfig(), attention_backend="reference",
                 scheduler_config=SchedulerConfig(max_model_len=model.max_model_len))
    config = EngineConfig(**parts, tensor_parallel_size=2, enable_expert_parallel=True)
    assert config.model_config.enable_expert_parallel is True
    assert EngineConfig(**parts).model_config.enable_expert_parallel is False
    with pytest.raises(ValueError, match="EngineConfig.enable_expert_parallel must be True or"):
        EngineConfig(**parts, enable_expert_parallel="yes")
    with pytest.raises(ValueError, match="EngineConfig.attention_backend must be one of"):
        EngineConfig(**{**parts, "attention_backend": "flash"})
