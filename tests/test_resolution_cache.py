"""resolution_cache: a warm start reads what transformers resolved, identically, without torch."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.forward import build_model
from jaxserve.resolution_cache import CachedHFConfig, resolved_tokenizer
from jaxserve.tokenization.tokenizer_utils import load_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "mixtral", "qwen2_moe", "deepseek_v2")


def _records(cache_dir, kind):
    folder = os.path.join(cache_dir, "jaxserve-resolved")
    return sorted(n for n in os.listdir(folder) if n.endswith(f".{kind}.json"))


def _shapes(config):
    model = build_model(config, abstract=True)
    from flax import nnx

    return jax.tree.map(lambda x: (x.shape, str(x.dtype)), nnx.state(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_config_reads_as_transformers_resolved_it(tiny_checkpoint, tmp_path, family):
    path = tiny_checkpoint(family)
    fresh = ModelConfig.from_pretrained(path, dtype="float32", cache_dir=str(tmp_path))
    cached = ModelConfig.from_pretrained(path, dtype="float32", cache_dir=str(tmp_path))
    assert not isinstance(fresh.hf_config, CachedHFConfig)
    assert isinstance(cached.hf_config, CachedHFConfig)
    assert cached == fresh
    # every field the config holds reads the same (through JSON: tuples come back as lists)
    expected = json.loads(json.dumps(fresh.hf_config.to_dict()))
    assert cached.hf_config.to_dict() == expected
    for alias, target in fresh.hf_config.attribute_map.items():
        assert getattr(cached.hf_config, alias) == getattr(cached.hf_config, target)
    # the model code reads the same model-specific fields (MoE, MLA, ...) from both
    assert _shapes(cached) == _shapes(fresh)
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        cached.hf_config.not_a_field


def test_a_gguf_config_is_cached_too(tmp_path):
    from jaxserve.entrypoints.default_model import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as error:  # the package is installed by `make test`
        pytest.skip(f"default model not installed: {error}")
    fresh = ModelConfig.from_pretrained(path, cache_dir=str(tmp_path))
    cached = ModelConfig.from_pretrained(path, cache_dir=str(tmp_path))
    assert isinstance(cached.hf_config, CachedHFConfig) and cached == fresh


def test_an_edited_checkpoint_or_a_broken_record_resolves_afresh(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("llama")
    path, cache = tmp_path / "llama", str(tmp_path / "cache")
    path.mkdir()
    for name in os.listdir(source):
        (path / name).write_bytes((source / name).read_bytes())
    assert ModelConfig.from_pretrained(path, cache_dir=cache).num_layers == 2
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    config = ModelConfig.from_pretrained(path, cache_dir=cache)
    assert config.num_layers == 3 and not isinstance(config.hf_config, CachedHFConfig)
    assert len(_records(cache, "config")) == 2
    for name in _records(cache, "config"):
        with open(os.path.join(cache, "jaxserve-resolved", name), "w") as f:
            f.write("{not json")
    config = ModelConfig.from_pretrained(path, cache_dir=cache)
    assert config.num_layers == 3 and not isinstance(config.hf_config, CachedHFConfig)
    assert isinstance(ModelConfig.from_pretrained(path, cache_dir=cache).hf_config,
                      CachedHFConfig)  # written again


def test_a_cached_config_saves_a_config_json_that_reads_back_equal(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_moe")
    ModelConfig.from_pretrained(path, cache_dir=str(tmp_path / "cache"))
    cached = ModelConfig.from_pretrained(path, cache_dir=str(tmp_path / "cache"))
    cached.hf_config.save_pretrained(tmp_path / "saved")
    again = ModelConfig.from_pretrained(tmp_path / "saved")
    assert dataclasses.replace(again, model_dir=cached.model_dir) == cached


def test_the_tokenizer_loads_through_the_class_autotokenizer_chose(tiny_checkpoint, tmp_path):
    path = str(tiny_checkpoint("qwen2", with_tokenizer=True))
    first = resolved_tokenizer(path, str(tmp_path))
    assert len(_records(str(tmp_path), "tokenizer")) == 1
    second = resolved_tokenizer(path, str(tmp_path))
    assert type(second) is type(first)
    text = "def f(x):\n    return x * 2  # héllo"
    assert second.encode(text) == first.encode(text)
    assert second.eos_token_id == first.eos_token_id
    assert second.chat_template == first.chat_template


def test_a_warm_start_imports_no_torch(tiny_checkpoint, tmp_path):
    """The point of the records: transformers' config classes import torch (~2 s)."""
    path = str(tiny_checkpoint("qwen2", with_tokenizer=True))
    code = ("import sys; from jaxserve.config import ModelConfig; "
            "from jaxserve.tokenization.tokenizer_utils import load_tokenizer; "
            "ModelConfig.from_pretrained(sys.argv[1], cache_dir=sys.argv[2]); "
            "load_tokenizer(sys.argv[1], cache_dir=sys.argv[2]); "
            "print('torch' in sys.modules)")
    ModelConfig.from_pretrained(path, cache_dir=str(tmp_path))
    load_tokenizer(path, cache_dir=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code, path, str(tmp_path)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
