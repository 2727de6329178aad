"""EngineArgs: every option once, as an LLM keyword and a flag of serve and generate with
one default, checked before the model is read, and built into the config field it fills.
"""

import dataclasses

import pytest

from jaxserve import LLM
from jaxserve.config import CacheConfig
from jaxserve.engine.engine_args import EngineArgs, default_cache_dir, options
from jaxserve.entrypoints import cli

# For every option: a value other than its default, and the flags that give it.
OTHER_VALUES = {
    "dtype": ("float16", ["--dtype", "half"]),
    "seed": (7, ["--seed", "7"]),
    "load_format": ("dummy", ["--load-format", "dummy"]),
    "max_model_len": (32000, ["--max-model-len", "32k"]),
    "max_num_seqs": (8, ["--max-num-seqs", "8"]),
    "max_num_batched_tokens": (64, ["--max-num-batched-tokens", "64"]),
    "block_size": (32, ["--block-size", "32"]),
    "enable_prefix_caching": (False, ["--no-enable-prefix-caching"]),
    "num_gpu_blocks_override": (100, ["--num-gpu-blocks-override", "100"]),
    "kv_cache_memory_bytes": (2 * 2**30, ["--kv-cache-memory", "2GiB"]),
    "gpu_memory_utilization": (0.5, ["--gpu-memory-utilization", "0.5"]),
    "kv_cache_dtype": ("int8", ["--kv-cache-dtype", "int8"]),
    "tensor_parallel_size": (2, ["-tp", "2"]),
    "enable_expert_parallel": (True, ["--enable-expert-parallel"]),
    "quantization": ("int4", ["-q", "int4"]),
    "attention_backend": ("reference", ["--attention-backend", "reference"]),
    "skip_tokenizer_init": (True, ["--skip-tokenizer-init"]),
    "compilation_cache_dir": ("/tmp/jax-cache", ["--compilation-cache-dir", "/tmp/jax-cache"]),
    "long_prefill_token_threshold": (128, ["--long-prefill-token-threshold", "128"]),
    "scheduling_policy": ("priority", ["--scheduling-policy", "priority"]),
    "max_num_waiting": (4, ["--max-num-waiting", "4"]),
    "async_scheduling": (False, ["--no-async-scheduling"]),
    "background_compilation": (False, ["--no-background-compilation"]),
    "reasoning_parser": ("qwen3", ["--reasoning-parser", "qwen3"]),
}
# For every option that has a rule (all but the cache directory): a value it refuses.
BAD_VALUES = {
    "dtype": "int8", "seed": 1.5, "load_format": "pt", "max_model_len": 0, "max_num_seqs": 0,
    "max_num_batched_tokens": 0, "block_size": 12, "enable_prefix_caching": "yes",
    "num_gpu_blocks_override": 1, "kv_cache_memory_bytes": 0, "gpu_memory_utilization": 1.5,
    "kv_cache_dtype": "fp8_e5m2",
    "tensor_parallel_size": 0, "enable_expert_parallel": 1, "quantization": "fp8",
    "attention_backend": "flash",
    "skip_tokenizer_init": "no", "long_prefill_token_threshold": -1,
    "scheduling_policy": "lifo", "max_num_waiting": 0, "async_scheduling": None,
    "background_compilation": "on", "reasoning_parser": "granite",
}
COMMANDS = (["serve", "m"], ["generate", "m", "--prompt", "hi"])


def test_the_tables_name_every_option():
    names = {field.name for field in options()}
    assert set(OTHER_VALUES) == names
    assert set(BAD_VALUES) == names - {"compilation_cache_dir"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_a_flag_defaulting_to_the_options_default(command):
    args = cli.build_parser().parse_args(command)
    assert {field.name for field in options()} <= set(vars(args))
    # the one CLI default of its own: the command line keeps compiled programs
    assert EngineArgs.from_cli_args("m", args) == EngineArgs(
        "m", compilation_cache_dir=default_cache_dir())


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_set_every_option(command):
    flags = [flag for _, option_flags in OTHER_VALUES.values() for flag in option_flags]
    args = cli.build_parser().parse_args([*command, *flags])
    assert EngineArgs.from_cli_args("m", args) == EngineArgs(
        "m", **{name: value for name, (value, _) in OTHER_VALUES.items()})


def test_an_empty_cache_dir_turns_the_cache_off_and_convert_takes_dtype_and_tp():
    args = cli.build_parser().parse_args(["serve", "--compilation-cache-dir", ""])
    assert EngineArgs.from_cli_args("m", args).compilation_cache_dir is None
    args = cli.build_parser().parse_args(["convert", "m", "out", "--dtype", "half", "-tp", "2"])
    parsed = EngineArgs.from_cli_args("m", args)
    assert (parsed.dtype, parsed.tensor_parallel_size) == ("float16", 2)


def test_llm_passes_every_keyword_to_engine_args(monkeypatch):
    built = []

    def capture(self):
        built.append(self)
        raise KeyboardInterrupt  # stop before a model is read

    monkeypatch.setattr(EngineArgs, "create_engine_config", capture)
    values = {name: value for name, (value, _) in OTHER_VALUES.items()}
    for kwargs in ({}, values):
        with pytest.raises(KeyboardInterrupt):
            LLM("m", progress=False, **kwargs)
    assert built == [EngineArgs("m"), EngineArgs("m", **values)]


def test_an_unknown_llm_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM("/no/such/model", max_num_sequences=4)


@pytest.mark.parametrize("name,value", BAD_VALUES.items())
def test_a_bad_value_is_a_value_error_naming_the_option_before_the_model_is_read(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be .*, got {value!r}"):
        LLM("/no/such/model", **{name: value})


def test_options_that_fill_a_config_field_take_its_default():
    defaults = EngineArgs("m")
    for field in options():
        target = field.metadata["config"]
        if target is not None and getattr(defaults, field.name) is not None:
            assert getattr(defaults, field.name) == getattr(*target), field.name
    assert defaults.block_size == CacheConfig.block_size == 16


def test_create_engine_config_puts_each_option_in_its_config(engine_checkpoint):
    values = {name: value for name, (value, _) in OTHER_VALUES.items()
              if name not in ("max_model_len", "tensor_parallel_size")}  # 512, 1 device
    config = EngineArgs(str(engine_checkpoint("qwen2")), **values).create_engine_config()
    built = {**dataclasses.asdict(config.cache_config),
             **dataclasses.asdict(config.scheduler_config),
             **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
             "dtype": config.model_config.dtype}
    built["scheduling_policy"] = built.pop("policy")
    assert {name: built[name] for name in values} == values
    assert config.model_config.enable_expert_parallel is True
    assert config.scheduler_config.max_model_len == config.model_config.max_model_len == 512
    default = EngineArgs(str(engine_checkpoint("qwen2"))).create_engine_config()
    assert default.scheduler_config.max_num_batched_tokens == 512  # min(2048, max_model_len)
