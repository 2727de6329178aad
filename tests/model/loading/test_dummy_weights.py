"""`load_format="dummy"`: random weights with a real load's shapes, dtypes and shardings,
from a directory holding config.json alone; an engine generates from them."""

import argparse
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.engine_args import EngineArgs
from jaxserve.model.loading.loader import load_model
from jaxserve.parallel.sharding import make_mesh

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def _config_only(checkpoint, tmp_path):
    """A copy of `checkpoint`'s config.json alone: no weight file to read."""
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    return tmp_path


def _leaves(model) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): variable[...] for path, variable in flat}


def _assert_same_layout(dummy, real) -> None:
    dummy, real = _leaves(dummy), _leaves(real)
    assert dummy.keys() == real.keys()
    for name, array in real.items():
        got = dummy[name]
        assert (got.shape, got.dtype) == (array.shape, array.dtype), name
        assert got.sharding.is_equivalent_to(array.sharding, array.ndim), name
        assert bool(np.isfinite(np.asarray(got, np.float32)).all()), name
    assert not all(np.array_equal(dummy[n], real[n]) for n in real)  # not the checkpoint's


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v2"])  # dense; MLA with MoE stacks
def test_dummy_params_match_a_real_load_from_a_config_only_directory(tiny_checkpoint,
                                                                     tmp_path, family):
    checkpoint = tiny_checkpoint(family)  # float32 on disk, cast to bfloat16 on loading
    real = load_model(checkpoint, ModelConfig.from_pretrained(checkpoint, dtype="bfloat16"))
    config_dir = _config_only(checkpoint, tmp_path)
    config = ModelConfig.from_pretrained(config_dir, dtype="bfloat16")
    _assert_same_layout(load_model(config_dir, config, load_format="dummy"), real)


def test_dummy_weights_are_the_same_each_time_with_unit_norm_scales(tiny_checkpoint,
                                                                    tmp_path):
    config_dir = _config_only(tiny_checkpoint("qwen2"), tmp_path)
    config = ModelConfig.from_pretrained(config_dir, dtype="bfloat16")
    first, again = (_leaves(load_model(config_dir, config, load_format="dummy"))
                    for _ in range(2))
    np.testing.assert_array_equal(first["norm/weight"], 1.0)  # RMSNorm scales
    for name, array in first.items():
        np.testing.assert_array_equal(again[name], array)
    kernel = np.asarray(first["layers/0/mlp/gate_proj/kernel"], np.float32)
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002


@needs_8_devices
def test_dummy_params_shard_like_a_real_load_under_tensor_parallelism(tiny_checkpoint,
                                                                      tmp_path):
    checkpoint = tiny_checkpoint("qwen2_8heads")  # 2 KV heads over 4 ranks: replicated slots
    mesh = make_mesh(4)
    real = load_model(checkpoint, ModelConfig.from_pretrained(checkpoint), mesh=mesh)
    config_dir = _config_only(checkpoint, tmp_path)
    dummy = load_model(config_dir, ModelConfig.from_pretrained(config_dir), mesh=mesh,
                       load_format="dummy")
    _assert_same_layout(dummy, real)
    q_proj = dummy.layers[0].self_attn.q_proj.kernel[...]
    assert tuple(q_proj.sharding.spec) == (None, "model")
    assert q_proj.addressable_shards[0].data.shape == (64, 64 // 4)


@pytest.mark.slow  # the engine compiles every bucket
def test_an_engine_generates_finite_logprobs_from_dummy_weights(tiny_checkpoint, tmp_path,
                                                               engine_kwargs):
    config_dir = _config_only(tiny_checkpoint("qwen2"), tmp_path)
    llm = LLM(str(config_dir), load_format="dummy", skip_tokenizer_init=True, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": [5, 9, 17, 3]},
                            {"prompt_token_ids": list(range(3, 40))}], params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 6
        values = [lp.logprob for step in completion.logprobs for lp in step.values()]
        assert values and np.isfinite(values).all()


def test_load_format_is_a_flag_and_a_bad_value_is_a_value_error_naming_it(tmp_path):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert parser.parse_args(["--load-format", "dummy"]).load_format == "dummy"
    assert parser.parse_args([]).load_format == "auto"
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(str(tmp_path), load_format="random")
    with pytest.raises(ValueError, match="load_format"):
        load_model(tmp_path, None, load_format="random")
