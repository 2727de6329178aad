"""The loader maps HF safetensors onto declared parameters, and fails with clear messages."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxserve.config import ModelConfig
from jaxserve.model.forward import build_model
from jaxserve.model.loading.loader import load_model
from jaxserve.model.loading.safetensors_reader import SafetensorsReader


def _load(path, dtype="float32"):
    return load_model(path, ModelConfig.from_pretrained(path, dtype=dtype))


def _rewrite_checkpoint(source, target, edit) -> None:
    """Copies a single-file float32 checkpoint, passing its tensors through `edit`."""
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    save_file(edit(tensors), target / "model.safetensors", metadata={"format": "pt"})


def test_params_are_the_checkpoint_tensors_transposed_where_torch_is_out_by_in(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    model = _load(path)
    tensors = load_file(path / "model.safetensors")
    attn = model.layers[1].self_attn
    np.testing.assert_array_equal(attn.q_proj.kernel[...],
                                  tensors["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(attn.k_proj.bias[...],
                                  tensors["model.layers.1.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(model.norm.weight[...], tensors["model.norm.weight"])
    assert attn.o_proj.bias is None


def test_tied_checkpoint_needs_no_lm_head_and_projects_with_the_embedding(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    assert "lm_head.weight" not in SafetensorsReader(path)
    model = _load(path)
    assert model.lm_head is None
    hidden = jnp.ones((3, 64))
    want = hidden @ model.embed_tokens.embedding[...].T
    np.testing.assert_allclose(model.compute_logits(hidden), want, rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_with_an_index_loads_the_same_params(tiny_checkpoint):
    single = tiny_checkpoint("llama")
    sharded = tiny_checkpoint("llama", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = nnx.state(_load(single)), nnx.state(_load(sharded))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_checkpoint_is_memory_mapped_and_cast_to_the_config_dtype(tiny_checkpoint):
    path = tiny_checkpoint("llama", dtype="bfloat16")
    stored = SafetensorsReader(path).get("model.embed_tokens.weight")
    assert stored.dtype == ml_dtypes.bfloat16 and not stored.flags.writeable
    assert isinstance(stored.base, np.memmap) or isinstance(stored.base.base, np.memmap)
    model = _load(path, dtype="float32")
    assert model.embed_tokens.embedding[...].dtype == jnp.float32
    np.testing.assert_array_equal(model.embed_tokens.embedding[...], stored.astype(np.float32))


def test_float32_checkpoint_loads_as_bfloat16_when_asked(tiny_checkpoint):
    model = _load(tiny_checkpoint("mistral"), dtype="bfloat16")
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_abstract_build_runs_no_initialiser(tiny_checkpoint):
    config = ModelConfig.from_pretrained(tiny_checkpoint("qwen3"), dtype="float32")
    leaves = jax.tree.leaves(nnx.state(build_model(config, abstract=True)))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


def test_missing_tensor_is_named_with_its_expected_shape(tiny_checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt",
                        lambda tensors: {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=rf"has no tensor '{name}' \(the model expects shape "
                                         rf"\(128, 64\)\)"):
        _load(tmp_path / "ckpt")


def test_mis_shaped_tensor_is_named_with_both_shapes(tiny_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt",
                        lambda tensors: {**tensors, name: tensors[name][:16]})
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(16, 64\) in the "
                                         rf"checkpoint, the model expects \(32, 64\)"):
        _load(tmp_path / "ckpt")


def test_unknown_architecture_is_rejected_before_reading_weights(tiny_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    (target / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"unknown model architecture 'FooForCausalLM'; "
                                         r"supported: .*LlamaForCausalLM"):
        _load(target)


def test_directory_without_safetensors_is_a_clear_error(tiny_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), target)
    (target / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        _load(target)
