"""Logical axes -> PartitionSpecs, meshes, and a tensor-parallel model equal to TP=1.

Runs on CPU with 8 host devices (tests/conftest.py sets XLA_FLAGS before jax starts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from jaxserve.config import ModelConfig
from jaxserve.model.loading.loader import load_model
from jaxserve.testing.engine_step import engine_step
from jaxserve.parallel.sharding import (kv_pool_sharding, logical_sharding, logical_to_spec,
                                        make_mesh, no_sharding)
from jaxserve.parallel.tensor_parallel import tp_model_config
from pallas_kernels.ragged_paged_attention import kv_pool_shape

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")


@needs_4_devices
def test_make_mesh_has_data_and_model_axes_of_auto_type():
    mesh = make_mesh(tp=2, dp=2)
    assert dict(mesh.shape) == {"data": 2, "model": 2}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_make_mesh_rejects_more_devices_than_exist():
    with pytest.raises(ValueError, match="devices needed"):
        make_mesh(tp=len(jax.devices()) + 1)


@needs_4_devices
def test_rules_shard_heads_mlp_and_vocab_over_model():
    mesh = make_mesh(tp=4)
    assert logical_to_spec(("embed", "q_heads"), (64, 64), mesh) == PartitionSpec(None, "model")
    assert logical_to_spec(("mlp", "embed"), (128, 64), mesh) == PartitionSpec("model", None)
    assert logical_to_spec(("vocab", "embed"), (256, 64), mesh) == PartitionSpec("model", None)
    assert logical_to_spec(("norm",), (64,), mesh) == PartitionSpec(None)


@needs_4_devices
def test_a_dim_the_mesh_does_not_divide_stays_replicated():
    mesh = make_mesh(tp=4)
    assert logical_to_spec(("embed", "kv_heads"), (64, 2), mesh) == PartitionSpec(None, None)
    assert kv_pool_sharding((2, 8, 16, 32), mesh).spec == PartitionSpec(None, None, None, None)
    assert kv_pool_sharding((4, 8, 16, 32), mesh).spec == PartitionSpec("model", None, None,
                                                                        None)


def test_a_mesh_axis_is_used_by_one_dim_only():
    mesh = make_mesh(tp=1)
    assert logical_to_spec(("q_heads", "mlp"), (8, 8), mesh) == PartitionSpec("model", None)


def test_unknown_logical_axis_is_named():
    with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
        logical_to_spec(("heads",), (8,), make_mesh())


def test_without_a_mesh_everything_goes_to_the_default_device():
    assert logical_sharding(("vocab", "embed"), (256, 64)) == no_sharding()
    assert no_sharding().device_set == {jax.devices()[0]}


# TP = 4 is slow: the default run has TP = 4 engines (tests/parallel: DeepSeek-V2, Qwen2-MoE).
@needs_4_devices
@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_logits_match_a_single_device(tp, tiny_checkpoint, paged_step):
    path = tiny_checkpoint("llama")
    config = ModelConfig.from_pretrained(path, dtype="float32")
    tokens = [list(range(3, 40)), list(range(50, 60))]
    ids, positions, metadata = paged_step(tokens, [0, 0], [[3, 1, 5], [2]], block_size=16,
                                          num_tokens=64, num_seqs=2, max_blocks=4)

    def run(mesh):
        slots = tp_model_config(config, 1 if mesh is None else tp).num_kv_heads
        shape = kv_pool_shape(slots, 8, 16, config.head_dim)
        model = load_model(path, config, mesh=mesh)
        pools = tuple((jax.device_put(jnp.zeros(shape), kv_pool_sharding(shape, mesh)),
                       jax.device_put(jnp.zeros(shape), kv_pool_sharding(shape, mesh)))
                      for _ in range(config.num_layers))
        logits, _ = engine_step(model, all_token_logits=True, mesh=mesh)(pools, ids, positions,
                                                                         metadata)
        return model, np.asarray(logits)

    sharded, logits = run(make_mesh(tp=tp))
    _, expected = run(None)
    assert sharded.layers[0].self_attn.q_proj.kernel[...].sharding.spec == PartitionSpec(
        None, "model")
    assert len(sharded.layers[0].mlp.down_proj.kernel[...].sharding.device_set) == tp
    np.testing.assert_allclose(logits, expected, atol=1e-5)
