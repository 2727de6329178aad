"""The registry maps HF architecture names to model classes and rejects unknown ones."""

import pytest

from jaxserve.model.llama import LlamaForCausalLM
from jaxserve.model.registry import model_class, supported_architectures


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM",
                                          "MistralForCausalLM", "Qwen3ForCausalLM"])
def test_llama_family_architectures_share_one_class(architecture):
    assert model_class(architecture) is LlamaForCausalLM


def test_supported_architectures_are_sorted_and_complete():
    names = supported_architectures()
    assert names == tuple(sorted(names))
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
            "Qwen3ForCausalLM"} <= set(names)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown model architecture 'GPT2LMHeadModel'; "
                                         r"supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_class("GPT2LMHeadModel")
