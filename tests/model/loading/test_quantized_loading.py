"""`quantization` at load: int8 / int4 quantize an HF checkpoint's Linear kernels (and only
those), "none" and the default keep it float, and under TP each part of a quantized kernel
shards like the kernel, a K axis only where its groups split with it."""

import dataclasses

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxserve.config import ModelConfig
from jaxserve.model.loading.loader import load_model
from jaxserve.model.quantization import QuantizedWeight, quantize
from jaxserve.parallel.sharding import make_mesh

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def _load(path, quantization, mesh=None):
    config = dataclasses.replace(ModelConfig.from_pretrained(path, dtype="float32"),
                                 quantization=quantization)
    return load_model(path, config, mesh=mesh)


# int4: down_proj (K = 128) in one group of 128; int4_g32: in groups of 32 like the rest
@pytest.mark.parametrize("kind,groups", [("int8", None), ("int4", None), ("int4_g32", 32)])
def test_linear_kernels_quantize_at_load_and_the_rest_stays_float(tiny_checkpoint, kind,
                                                                   groups):
    path = tiny_checkpoint("qwen2")
    model = _load(path, kind)
    tensors = load_file(path / "model.safetensors")
    layer = model.layers[1]
    for module, name in ((layer.self_attn.k_proj, "self_attn.k_proj"),
                         (layer.mlp.down_proj, "mlp.down_proj")):
        weight = module.kernel[...]
        assert isinstance(weight, QuantizedWeight) and weight.bits == int(kind[3])
        expected = quantize(tensors[f"model.layers.1.{name}.weight"].T, kind[:4],
                            group_size=groups)
        assert weight.group_size == expected.group_size
        np.testing.assert_array_equal(weight.dequantize(), expected.dequantize())
    np.testing.assert_array_equal(layer.self_attn.k_proj.bias[...],
                                  tensors["model.layers.1.self_attn.k_proj.bias"])
    assert isinstance(model.embed_tokens.embedding[...], jax.Array)
    assert isinstance(model.norm.weight[...], jax.Array)


@pytest.mark.parametrize("quantization", [None, "none"])
def test_an_hf_checkpoint_loads_float_by_default_and_with_none(tiny_checkpoint, quantization):
    model = _load(tiny_checkpoint("qwen2"), quantization)
    assert isinstance(model.layers[0].mlp.up_proj.kernel[...], jax.Array)


def _shard(array):
    return array.addressable_shards[0].data.shape


@needs_8_devices
@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_quantized_kernels_shard_with_their_groups(tiny_checkpoint, tp):
    # hidden 64 (int4 groups of 32: 2 per column), MLP width 128 (one group of 128)
    path = tiny_checkpoint("qwen2_8heads")
    layer = _load(path, "int4", mesh=make_mesh(tp)).layers[0]
    q = layer.self_attn.q_proj.kernel[...]  # [64, 64] column-parallel: N splits
    assert _shard(q.packed) == (32, 64 // tp) and _shard(q.scales) == (2, 64 // tp)
    o = layer.self_attn.o_proj.kernel[...]  # [64, 64] row-parallel: K splits with 2 groups
    if tp == 2:
        assert _shard(o.packed) == (16, 64) and _shard(o.scales) == (1, 64)
    else:  # 2 groups over 4 ranks would cut a group: K stays whole
        assert _shard(o.packed) == (32, 64) and _shard(o.scales) == (2, 64)
    down = layer.mlp.down_proj.kernel[...]  # [128, 64]: one group of 128 rows
    assert _shard(down.packed) == (64, 64) and _shard(down.scales) == (1, 64)
    single = _load(path, "int4").layers[0].self_attn.o_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(o.dequantize()), np.asarray(single.dequantize()))
