"""EngineArgs: every engine option once, with its type, default, help text and rule.

`LLM(model, **options)` and `jaxserve serve|generate` (whose flags `add_cli_args` generates
from the fields) both build an `EngineArgs`, and `create_engine_config()` turns it into a
validated `EngineConfig`. An option that fills a config field takes that field's default
and rule (`config.check_rule`), so each is stated once, in config.py; the others state
theirs here. Every rule is checked when EngineArgs is built, before a model is read, with
the option named. Building the config also applies the preferred XLA:CPU flags, which must
happen before JAX creates its CPU client.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Callable

from jaxserve.config import (ATTENTION_BACKENDS, KV_CACHE_DTYPES, LOAD_FORMATS, QUANTIZATIONS,
                             REASONING_PARSERS, SCHEDULER_POLICIES, CacheConfig, EngineConfig,
                             ModelConfig, SchedulerConfig, check_rule)
from jaxserve.runner.cpu_flags import apply_preferred_cpu_flags


# dtype names: "auto" (float32 on CPU, bfloat16 on GPU/TPU), the model dtypes, vLLM's aliases.
DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
          "float16": "float16", "half": "float16"}
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'8GiB', '512M', '1e9' or '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 4GiB, 512M)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def parse_length(text: str) -> int:
    """'4096', '32k' or '1m' -> tokens (k = 1000, K = 1024, as vLLM reads them)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k)")
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20}[match.group(2)]
    return int(match.group(1)) * scale


def _path_or_none(text: str) -> str | None:
    return text or None  # '' turns the option off


def default_cache_dir() -> str:
    """Where the CLI keeps compiled programs between starts ($XDG_CACHE_HOME/jaxserve/jax)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jaxserve", "jax")


def _option(default: object, help: str, *, expected: str | None = None,
            ok: Callable[[object], bool] | None = None, config: tuple[type, str] | None = None,
            flags: tuple[str, ...] = (), parse: Callable[[str], object] | None = None,
            choices: tuple[str, ...] | list[str] | None = None,
            cli_default: Callable[[], object] | None = None):
    """A field of EngineArgs: `ok(value)` must hold ("must be {expected}"); `config` names
    the (config class, field) it fills; the rest shapes its flag: more `flags`, `parse`
    (text -> value, default: the field's type), `choices`, `cli_default()` for the CLI."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, expected=expected, ok=ok, config=config, flags=flags, parse=parse,
        choices=choices, cli_default=cli_default))


def _config_option(config: type, name: str, help: str, *, derived: bool = False, **cli):
    """An option that fills `config`'s field `name`, with that field's default and rule;
    `derived`: it defaults to None instead, which create_engine_config works out."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    expected, ok = field.metadata.get("expected"), field.metadata.get("ok")  # None: any value
    if derived:
        return _option(None, help, expected=f"None or {expected}", config=(config, name),
                       ok=lambda value: value is None or ok(value), **cli)
    return _option(field.default, help, expected=expected, ok=ok, config=(config, name), **cli)


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """The engine's options: `LLM` keywords, `jaxserve serve` flags (`--max-num-seqs`)."""

    model: str  # a local checkpoint: HF directory, .gguf file, or `jaxserve convert` output
    dtype: str = _option(
        "auto", "weights and activations; auto = float32 on CPU, bfloat16 on GPU/TPU",
        expected=f"one of {tuple(DTYPES)}", choices=sorted(DTYPES),
        ok=lambda value: isinstance(value, str) and value in DTYPES)
    seed: int = _config_option(EngineConfig, "seed", "seed of requests that bring none")
    load_format: str = _config_option(
        EngineConfig, "load_format", "auto: the checkpoint's weights; dummy: random weights "
        "made on the devices from config.json alone (benchmarks)", choices=LOAD_FORMATS)
    max_model_len: int | None = _config_option(
        SchedulerConfig, "max_model_len", derived=True, parse=parse_length,
        help="context length (prompt + output); default: the model's")
    max_num_seqs: int = _config_option(SchedulerConfig, "max_num_seqs", "most requests per step")
    max_num_batched_tokens: int | None = _config_option(
        SchedulerConfig, "max_num_batched_tokens", derived=True,
        help=f"most tokens per step; default min({SchedulerConfig.max_num_batched_tokens}, "
             "max-model-len)")
    block_size: int = _config_option(CacheConfig, "block_size", "tokens per KV cache block")
    enable_prefix_caching: bool = _config_option(
        CacheConfig, "enable_prefix_caching", "share KV blocks of common prompt prefixes")
    num_gpu_blocks_override: int | None = _config_option(
        CacheConfig, "num_gpu_blocks_override",
        "KV cache blocks (the null block included) instead of sizing them from memory")
    kv_cache_memory_bytes: int | None = _config_option(
        CacheConfig, "kv_cache_memory_bytes", "KV cache size, e.g. 4GiB (CPU default: a "
        "fixed budget; overrides --gpu-memory-utilization)", flags=("--kv-cache-memory",),
        parse=parse_size)
    kv_cache_dtype: str = _config_option(
        CacheConfig, "kv_cache_dtype", "KV cache storage: auto = the model dtype; fp8 "
        "(= fp8_e4m3) or int8 store 8-bit keys and values with a scale per token and head "
        "(about 2x / 4x the blocks of bfloat16 / float32; not for MLA models)",
        choices=KV_CACHE_DTYPES)
    gpu_memory_utilization: float = _config_option(
        CacheConfig, "gpu_memory_utilization",
        "share of device memory for weights and KV cache (GPU/TPU)")
    tensor_parallel_size: int = _config_option(
        EngineConfig, "tensor_parallel_size", "devices to shard the model over", flags=("-tp",))
    enable_expert_parallel: bool = _config_option(
        EngineConfig, "enable_expert_parallel", "MoE models: split the experts over the "
        "tensor-parallel devices instead of each expert's MLP width")
    quantization: str | None = _config_option(
        EngineConfig, "quantization", "Linear weights: default as stored (a GGUF stays "
        "quantized); none = float; int8 (per channel), int4 (groups of 128 or 32) or "
        "int4_g32 (groups of 32) "
        "quantizes them at load", flags=("-q",), choices=QUANTIZATIONS)
    attention_backend: str | None = _config_option(
        EngineConfig, "attention_backend", derived=True, choices=ATTENTION_BACKENDS,
        help="default: cpu (the native kernel) on CPU, pallas on GPU/TPU; reference is pure jnp")
    skip_tokenizer_init: bool = _config_option(
        EngineConfig, "skip_tokenizer_init", "load no tokenizer: prompts are token ids and "
        "outputs carry no text")
    compilation_cache_dir: str | None = _config_option(
        EngineConfig, "compilation_cache_dir", "JAX persistent compilation cache, so later "
        "starts compile nothing (default: %(default)s; '' turns it off)",
        parse=_path_or_none, cli_default=default_cache_dir)
    long_prefill_token_threshold: int = _config_option(
        SchedulerConfig, "long_prefill_token_threshold",
        "chunk prompts longer than this (0 = only the step budget)")
    scheduling_policy: str = _config_option(
        SchedulerConfig, "policy", "the waiting queue's order: first come first served, or "
        "by request priority (lower first)", choices=SCHEDULER_POLICIES)
    max_num_waiting: int | None = _config_option(
        SchedulerConfig, "max_num_waiting",
        "queue cap: further requests get 503 (default: no cap)")
    async_scheduling: bool = _config_option(
        SchedulerConfig, "async_scheduling", "plan each step while the previous one computes")
    background_compilation: bool = _config_option(
        EngineConfig, "background_compilation", "serve once the smallest buckets are "
        "compiled and compile the rest meanwhile (off under multi-host)")
    reasoning_parser: str | None = _config_option(
        EngineConfig, "reasoning_parser", "the models' think block syntax: the server "
        "splits it into reasoning_content; structured output applies after it",
        choices=REASONING_PARSERS)

    def __post_init__(self) -> None:
        for field in options():
            check_rule(field.name, field, getattr(self, field.name))
        object.__setattr__(self, "dtype", DTYPES[self.dtype])

    # -- the command line ----------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *,
                     only: tuple[str, ...] | None = None) -> None:
        """A flag per option (or per option in `only`), named after it: `--max-num-seqs`;
        a boolean that defaults to on also gets `--no-...`."""
        group = parser.add_argument_group("engine")
        types = typing.get_type_hints(cls)
        for field in options():
            if only is not None and field.name not in only:
                continue
            meta = field.metadata
            default = meta["cli_default"]() if meta["cli_default"] else field.default
            kwargs = dict(dest=field.name, default=default, help=meta["help"])
            if types[field.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
                kwargs["help"] += " (default: on)" if default else ""
            else:  # int, float, str, or one of them | None
                value_type = next(t for t in (*typing.get_args(types[field.name]),
                                              types[field.name]) if t is not type(None))
                kwargs.update(type=meta["parse"] or value_type, choices=meta["choices"])
            group.add_argument("--" + field.name.replace("_", "-"), *meta["flags"], **kwargs)

    @classmethod
    def from_cli_args(cls, model: str, args: argparse.Namespace) -> EngineArgs:
        """The options `add_cli_args` parsed into `args` (those it added)."""
        parsed = vars(args)
        return cls(model, **{f.name: parsed[f.name] for f in options() if f.name in parsed})

    # -- the engine's config -------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        """Reads the model's config and builds every part; ValueError names a bad option."""
        apply_preferred_cpu_flags()
        model_config = ModelConfig.from_pretrained(
            self.model, dtype=self.dtype, max_model_len=self.max_model_len,
            cache_dir=self.compilation_cache_dir)
        tp = self.tensor_parallel_size
        if tp > 1:
            import jax

            from jaxserve.parallel.tensor_parallel import check_tensor_parallel

            check_tensor_parallel(model_config.num_heads, model_config.num_kv_heads, tp)
            if tp > len(jax.devices()):
                raise ValueError(f"tensor_parallel_size {tp} exceeds the "
                                 f"{len(jax.devices())} devices")
        from jaxserve.model.ops import default_attention_backend

        max_len = model_config.max_model_len
        # No budget given: the scheduler's default, never more than the context.
        max_tokens = self.max_num_batched_tokens or min(
            SchedulerConfig.max_num_batched_tokens, max_len)
        return EngineConfig(
            model_config=model_config, cache_config=CacheConfig(**self._fill(CacheConfig)),
            scheduler_config=SchedulerConfig(**self._fill(
                SchedulerConfig, max_model_len=max_len, max_num_batched_tokens=max_tokens)),
            **self._fill(EngineConfig,
                         attention_backend=self.attention_backend or default_attention_backend()))

    def _fill(self, config: type, **derived: object) -> dict[str, object]:
        """`config`'s fields from the options that fill them, then the `derived` ones."""
        fields = {f.metadata["config"][1]: getattr(self, f.name) for f in options()
                  if f.metadata["config"] and f.metadata["config"][0] is config}
        return {**fields, **derived}


def options() -> tuple[dataclasses.Field, ...]:
    """EngineArgs' options: every field but `model`."""
    return dataclasses.fields(EngineArgs)[1:]


def create_engine_config(model: str, **kwargs: object) -> EngineConfig:
    """`EngineArgs(model, **kwargs).create_engine_config()`."""
    return EngineArgs(model, **kwargs).create_engine_config()
