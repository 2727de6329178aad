"""SamplingParams: vLLM's defaults, normalization and validation messages."""

import pytest

from jaxserve.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1, 1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.0, 0.0, 1.0)
    assert (params.max_tokens, params.min_tokens, params.logprobs, params.seed) == (
        16, 0, None, None)
    assert params.stop == () and params.stop_token_ids == () and not params.ignore_eos
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert params.detokenize and not params.include_stop_str_in_output


@pytest.mark.parametrize("name, value, allowed", [
    ("n", 0, "integer >= 1"),
    ("temperature", -0.1, r"\[0, inf\)"),
    ("top_p", 0.0, r"\(0, 1\]"),
    ("top_p", 1.5, r"\(0, 1\]"),
    ("top_k", -2, "0 or -1"),
    ("top_k", 1.5, "0 or -1"),
    ("min_p", 1.1, r"\[0.0, 1.0\]"),
    ("presence_penalty", 2.5, r"\[-2.0, 2.0\]"),
    ("frequency_penalty", -3, r"\[-2.0, 2.0\]"),
    ("repetition_penalty", 0.0, r"\(0, inf\)"),
    ("max_tokens", 0, "None or an integer >= 1"),
    ("logprobs", 21, r"\[0, 20\]"),
    ("prompt_logprobs", -1, r"\[0, 20\]"),
    ("seed", 2**64, "integer in"),
    ("stop", [""], "empty strings"),
    ("stop", [1], "list of strings"),
    ("stop_token_ids", [-1], "integers >= 0"),
    ("logit_bias", {5: 101.0}, r"logit_bias\[5\] must be in \[-100.0, 100.0\], got 101.0"),
    ("logit_bias", {"5": 1.0}, "integer token ids"),
])
def test_each_violation_names_the_parameter_the_value_and_the_range(name, value, allowed):
    with pytest.raises(ValueError, match=allowed) as info:
        SamplingParams(**{name: value})
    assert f"SamplingParams.{name}" in str(info.value)
    assert repr(value) in str(info.value) or name == "logit_bias"


def test_min_tokens_may_not_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be \[0, max_tokens=4\], got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_max_tokens_none_means_up_to_the_context_length():
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="x", detokenize=False)


def test_top_k_minus_one_is_normalized_to_zero():
    assert SamplingParams(top_k=-1).top_k == 0


def test_a_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="END").stop == ("END",)


def test_stop_token_ids_are_kept_in_order_and_as_a_set():
    params = SamplingParams(stop_token_ids=[5, 3])
    assert params.stop_token_ids == (5, 3) and params.all_stop_token_ids == {3, 5}


def test_a_temperature_below_1e_5_is_greedy_and_disables_truncation():
    params = SamplingParams(temperature=1e-6, top_p=0.5, top_k=3, min_p=0.2)
    assert params.is_greedy and params.sampling_type is SamplingType.GREEDY
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_random_sampling_types_depend_on_the_seed():
    assert SamplingParams().sampling_type is SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED


def test_logit_bias_values_become_floats():
    assert SamplingParams(logit_bias={3: 2}).logit_bias == {3: 2.0}


def test_sampling_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5


def test_structured_outputs_take_exactly_one_spec():
    from jaxserve.sampling_params import StructuredOutputsParams

    with pytest.raises(ValueError, match="structured_outputs must set exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"exactly one .*\['json', 'regex'\]"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="structured_outputs.choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs.regex must be a string"):
        StructuredOutputsParams(regex=5)
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs must be None or"):
        SamplingParams(structured_outputs={"json": {}})
    choice = StructuredOutputsParams(choice=["a", "b"])
    assert choice.choice == ("a", "b") and choice.grammar_spec() == ("choice", '["a", "b"]')
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert StructuredOutputsParams(json=schema).grammar_spec() == (
        "json", '{"type": "object", "properties": {"b": {}, "a": {}}}')  # key order kept
    assert StructuredOutputsParams(json_object=True).grammar_spec()[0] == "json"
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    assert params.needs_sampled_tokens and not SamplingParams().needs_sampled_tokens
