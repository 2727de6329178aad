"""`jaxserve convert` writes a sharded Orbax checkpoint that loads back to the same model.

The restored params equal the loaded ones bit for bit, with the same shardings, so logits
and greedy tokens are identical; a TP size whose KV head slots differ is refused by name.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.entrypoints.cli import main
from jaxserve.model.loading.loader import load_model
from jaxserve.model.loading.orbax_checkpoint import is_orbax_checkpoint
from jaxserve.parallel.sharding import make_mesh

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def converted(heads8_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("orbax") / "tp4")
    assert main(["convert", heads8_checkpoint, out, "--tensor-parallel-size", "4"]) == 0
    return out


@needs_8_devices
def test_convert_writes_an_orbax_checkpoint_with_its_config(converted):
    assert is_orbax_checkpoint(converted)
    config = ModelConfig.from_pretrained(converted, dtype="float32")
    assert (config.num_heads, config.num_kv_heads, config.architecture) == (
        8, 2, "Qwen2ForCausalLM")


@needs_8_devices
def test_restored_params_equal_the_loaded_ones_with_their_shardings(heads8_checkpoint,
                                                                    converted):
    mesh = make_mesh(tp=4)
    config = ModelConfig.from_pretrained(heads8_checkpoint, dtype="float32")
    loaded = nnx.to_pure_dict(nnx.state(load_model(heads8_checkpoint, config, mesh=mesh)))
    restored = nnx.to_pure_dict(nnx.state(load_model(converted, config, mesh=mesh)))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(restored), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_8_devices
def test_serving_the_converted_checkpoint_gives_identical_greedy_tokens(heads8_checkpoint,
                                                                        heads8_engine_kwargs,
                                                                        converted):
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]

    def tokens(path):
        llm = LLM(path, tensor_parallel_size=4, **heads8_engine_kwargs)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    assert tokens(converted) == tokens(heads8_checkpoint)


@needs_8_devices
def test_a_tensor_parallel_size_with_other_kv_slots_is_refused(heads8_checkpoint, converted):
    config = ModelConfig.from_pretrained(converted, dtype="float32")
    with pytest.raises(ValueError, match="convert again"):
        load_model(converted, config, mesh=make_mesh(tp=2))
