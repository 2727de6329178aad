"""`LLM(..., quantization="int8" | "int4")`: greedy tokens equal the same engine run on a float
checkpoint holding the dequantized weights (the same math), batched, with prefix caching and
preemption, without TP (the native quantized GEMM on CPU) and at TP 2 (XLA's dot over the
weights dequantized in the step, sharded over the mesh)."""

import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve import LLM, SamplingParams
from jaxserve.model.quantization import QuantizedWeight, quantize
from jaxserve.testing.hf_reference import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
_LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([40], seed=3, vocab=256)[0]  # a cached prefix for half
    tails = random_prompts([1, 9, 17, 30, 5, 22, 3, 26], seed=4, vocab=256)
    return [shared + t if i % 2 else t + shared[:8] for i, t in enumerate(tails)]


@pytest.fixture(scope="module")
def dequantized_checkpoint(heads8_checkpoint, tmp_path_factory):
    """`dequantized_checkpoint(kind)`: heads8_checkpoint with every Linear weight replaced by
    what `kind` keeps of it, in float32."""
    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            target = tmp_path_factory.mktemp(f"dequantized-{kind}")
            shutil.copytree(heads8_checkpoint, target, dirs_exist_ok=True)
            tensors = load_file(f"{heads8_checkpoint}/model.safetensors")
            for name, value in tensors.items():
                if _LINEAR.search(name):  # [N, K] as torch keeps it
                    tensors[name] = np.ascontiguousarray(quantize(value.T, kind).dequantize().T)
            save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
            built[kind] = str(target)
        return built[kind]

    return get


def _generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_greedy_tokens_equal_the_engine_on_the_dequantized_weights(
        heads8_checkpoint, heads8_engine_kwargs, dequantized_checkpoint, prompts, kind, tp):
    quantized = LLM(heads8_checkpoint, quantization=kind, tensor_parallel_size=tp,
                    **heads8_engine_kwargs)
    layer = quantized.llm_engine.runner.params["layers"][0]
    assert isinstance(layer["mlp"]["down_proj"]["kernel"][...], QuantizedWeight)
    got = _generate(quantized, prompts)
    assert quantized.get_metrics()["num_preemptions"] > 0
    reference = LLM(dequantized_checkpoint(kind), tensor_parallel_size=tp,
                    **heads8_engine_kwargs)
    assert got == _generate(reference, prompts)
