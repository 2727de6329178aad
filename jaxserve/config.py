"""Frozen configuration dataclasses, validated once at construction.

Each class names the parameter and the allowed range in its errors. Derived numbers
(block counts, bucket ladders) live on the objects that derive them, never here.
This module must stay importable without jax or transformers at import time:
`jaxserve.core` reads the scheduler and cache configs from it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable


# --- ModelConfig -------------------------------------------------------------------------

_MODEL_DTYPES = ("float32", "bfloat16", "float16")
# RoPE variants the models implement, with the keys each needs beside `factor`.
_ROPE_REQUIRED_KEYS = (
    ("linear", ()),
    ("llama3", ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")),
    ("yarn", ("original_max_position_embeddings",)),
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of a model, read once from a local HF checkpoint directory."""

    model_dir: str  # local checkpoint: a directory (config.json, *.safetensors) or a .gguf
    architecture: str  # HF `architectures[0]`; the model registry maps it to a class
    vocab_size: int  # V: rows of the embedding and of the LM head
    hidden_size: int  # D: width of the residual stream
    num_layers: int  # decoder layers; each owns one key pool and one value pool
    num_heads: int  # N: query heads
    num_kv_heads: int  # K: key/value heads (GQA when K < N)
    head_dim: int  # H: may differ from D // N (Qwen3, some Llamas)
    intermediate_size: int  # F: width of the gated MLP
    rms_norm_eps: float  # epsilon of every RMSNorm
    rope_theta: float  # RoPE base wavelength
    # {"rope_type": "linear" | "llama3" | "yarn", "factor": ..., ...}; None for plain RoPE.
    rope_scaling: dict[str, object] | None = dataclasses.field(hash=False)
    tie_word_embeddings: bool  # the LM head reuses the embedding matrix
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2; Llama attention_bias)
    o_proj_bias: bool  # the attention output projection carries a bias (Llama attention_bias)
    mlp_bias: bool  # gate/up/down projections carry biases (Llama mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None  # attention window in tokens; None when no layer uses one
    layer_sliding_windows: tuple[int | None, ...]  # per layer: its window, None = full causal
    max_position_embeddings: int  # the longest context the checkpoint was trained for
    max_model_len: int  # the longest context served: <= max_position_embeddings
    eos_token_ids: tuple[int, ...]  # generating any of these ends a request
    bos_token_id: int | None  # the tokenizer's start token, if it has one
    dtype: str  # resolved "float32" | "bfloat16" | "float16": params and activations
    # MLA (DeepSeek-V2): the pool keeps one latent row of kv_lora_rank + qk_rope_head_dim
    # values per token instead of K/V heads; None for every other family.
    kv_latent_dim: int | None = None
    # The layout the model is built with: MoE expert stacks shard on E over the "model" mesh
    # axis instead of on their MLP width; the loader's rules and the MoE block read it.
    # The option is `EngineConfig.enable_expert_parallel`, which sets it.
    enable_expert_parallel: bool = False
    # How Linear kernels load (model/quantization.py): None as stored (a GGUF stays
    # quantized), "none" float, "int8" / "int4" quantized at load. The option is
    # `EngineConfig.quantization`, which sets it.
    quantization: str | None = None
    # The transformers config, kept for model-specific fields; not part of equality.
    hf_config: object = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings", "max_model_len"):
            value = getattr(self, name)
            _model_check(isinstance(value, int) and value > 0, name, "a positive integer", value)
        _model_check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                     f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
        _model_check(self.head_dim % 2 == 0, "head_dim", "even (RoPE rotates pairs)", self.head_dim)
        _model_check(self.rms_norm_eps > 0, "rms_norm_eps", "> 0", self.rms_norm_eps)
        _model_check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _model_check(self.max_model_len <= self.max_position_embeddings, "max_model_len",
                     f"<= max_position_embeddings={self.max_position_embeddings}",
                     self.max_model_len)
        _model_check(self.dtype in _MODEL_DTYPES, "dtype", f"one of {_MODEL_DTYPES}", self.dtype)
        _model_check(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                     "None or a positive integer", self.sliding_window)
        _model_check(self.kv_latent_dim is None or self.kv_latent_dim > 0, "kv_latent_dim",
                     "None or a positive integer", self.kv_latent_dim)
        _model_check(len(self.layer_sliding_windows) == self.num_layers, "layer_sliding_windows",
                     f"one entry per layer ({self.num_layers})", self.layer_sliding_windows)
        _model_check_rope_scaling(self.rope_scaling)
        _model_check(self.quantization in (None, *QUANTIZATIONS), "quantization",
                     f"None or one of {QUANTIZATIONS}", self.quantization)

    @classmethod
    def from_pretrained(cls, model_dir, *, dtype: str = "auto", max_model_len: int | None = None,
                        platform: str | None = None, cache_dir: str | None = None) -> ModelConfig:
        """Reads `model_dir/config.json` with transformers' AutoConfig and validates it.

        `model_dir` may also be a `.gguf` file, or a directory holding one (and no
        config.json): the config then comes from the GGUF metadata, and `model_dir` becomes
        the file's path. `dtype="auto"` resolves to float32 on CPU and bfloat16 on GPU/TPU
        (`platform` defaults to jax's default backend). `max_model_len=None` serves the full
        context. With `cache_dir`, what transformers resolved is recorded there and read back
        on later starts (`resolution_cache`: no torch import).
        """
        from jaxserve.hf_config import model_config_fields, read_hf_config
        from jaxserve.model.loading.gguf_reader import find_gguf_file, gguf_hf_config
        from jaxserve.resolution_cache import resolved_hf_config

        path = os.fspath(model_dir)
        gguf_file = find_gguf_file(path)
        if gguf_file is not None:
            path = gguf_file
            hf = resolved_hf_config(path, cache_dir, lambda: gguf_hf_config(gguf_file))
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"ModelConfig.model_dir: no config.json (nor a .gguf file) "
                                    f"in {path!r}")
        else:
            hf = resolved_hf_config(path, cache_dir, lambda: read_hf_config(path))
        fields = model_config_fields(hf, path)
        return cls(**fields, dtype=_model_resolve_dtype(dtype, platform),
                   max_model_len=(fields["max_position_embeddings"] if max_model_len is None
                                  else max_model_len))


def _model_check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{name} must be {expected}, got {value!r}")


def _model_check_rope_scaling(scaling: dict[str, object] | None) -> None:
    if scaling is None:
        return
    required = dict(_ROPE_REQUIRED_KEYS)
    rope_type = scaling.get("rope_type")
    _model_check(rope_type in required, "rope_scaling",
                 f"a rope_type in {('default', *required)}", rope_type)
    for key in ("factor", *required[rope_type]):
        value = scaling.get(key)
        _model_check(isinstance(value, (int, float)) and value > 0, "rope_scaling",
                     f"a positive {key!r} for rope_type {rope_type!r}", value)


def _model_resolve_dtype(dtype: str, platform: str | None) -> str:
    if dtype != "auto":
        return str(dtype)
    if platform is None:
        import jax  # only to ask which backend runs the model

        platform = jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"



# --- Field rules -------------------------------------------------------------------------
# A field that is also an engine option carries its rule (`_rule(default, expected, ok)`):
# the config checks it on construction ("CacheConfig.block_size must be ..."), and
# `EngineArgs` checks the same rule under the option's name before any model is read.


def _rule(default: object, expected: str, ok: Callable[[object], bool]):
    """A dataclass field whose values must pass `ok`; `expected` says which do."""
    return dataclasses.field(default=default, metadata={"expected": expected, "ok": ok})


def check_rule(name: str, field: dataclasses.Field, value: object) -> None:
    """ValueError "{name} must be {expected}, got {value!r}" if `field` has a rule that
    `value` breaks."""
    ok = field.metadata.get("ok")
    if ok is not None and not ok(value):
        raise ValueError(f"{name} must be {field.metadata['expected']}, got {value!r}")


def _check_rules(config: object) -> None:
    for field in dataclasses.fields(config):
        check_rule(f"{type(config).__name__}.{field.name}", field, getattr(config, field.name))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _at_least(low: int) -> Callable[[object], bool]:
    return lambda value: _is_int(value) and value >= low


def _none_or(ok: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or ok(value)


def _is_block_size(value: object) -> bool:
    return _is_int(value) and 1 <= value <= 256 and value & (value - 1) == 0


def _is_fraction(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


# --- CacheConfig and SchedulerConfig -----------------------------------------------------

SCHEDULER_POLICIES = ("fcfs", "priority")
# --kv-cache-dtype values (vLLM's flag): "auto" stores K/V in the model dtype; "fp8" (=
# "fp8_e4m3", float8_e4m3fn) and "int8" store them 8-bit with a float32 scale per token
# and KV head (runner/kv_cache.py resolves the name to the pools' dtype).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is cut up and sized; the runner derives the block count L."""

    block_size: int = _rule(16, "a power of two in [1, 256]", _is_block_size)  # S: tokens
    # Share full blocks between requests by content hash.
    enable_prefix_caching: bool = _rule(True, "a bool", _is_bool)
    # L (null block included); None = from memory.
    num_gpu_blocks_override: int | None = _rule(None, "None or an integer >= 2",
                                                _none_or(_at_least(2)))
    # Share of device memory the engine may use (weights and KV cache).
    gpu_memory_utilization: float = _rule(0.9, "in (0, 1]", _is_fraction)
    # Explicit KV budget in bytes (CPU); None = derive.
    kv_cache_memory_bytes: int | None = _rule(None, "None or a positive integer",
                                              _none_or(_at_least(1)))
    # What the pools store: the model dtype ("auto") or 8-bit rows with scales (more blocks
    # in the same memory, at a small cost in accuracy).
    kv_cache_dtype: str = _rule("auto", f"one of {KV_CACHE_DTYPES}",
                                lambda value: value in KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        _check_rules(self)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's budgets and policy; read once, never written back."""

    # T budget: tokens computed per step, before padding.
    max_num_batched_tokens: int = _rule(2048, "an integer >= 1", _at_least(1))
    max_num_seqs: int = _rule(256, "an integer >= 1", _at_least(1))  # B: requests at once
    # Prompt + output cap in tokens (ModelConfig.max_model_len).
    max_model_len: int = _rule(2048, "an integer >= 1", _at_least(1))
    # Most tokens one request may compute per step, so that a long prompt is chunked and
    # does not starve the others; 0 = only the step budget limits it.
    long_prefill_token_threshold: int = _rule(0, "an integer >= 0 (0 = off)", _at_least(0))
    # "fcfs" | "priority" (lower Request.priority first)
    policy: str = _rule("fcfs", f"one of {SCHEDULER_POLICIES}", SCHEDULER_POLICIES.__contains__)
    # add_request refuses beyond this many waiting requests; None = no cap.
    max_num_waiting: int | None = _rule(None, "None or an integer >= 1", _none_or(_at_least(1)))
    # Plan step N+1 while step N computes (Scheduler.schedule(ahead=True)), so the host's
    # scheduling and input work overlaps the devices'; off: each step waits for the last.
    async_scheduling: bool = _rule(True, "True or False", _is_bool)

    def __post_init__(self) -> None:
        _check_rules(self)


# --- EngineConfig ------------------------------------------------------------------------

# --quantization values (vLLM's flag): "none" makes every weight float, "int8" (per channel)
# and "int4" (groups of 128 where K allows, else 32) or "int4_g32" (groups of 32) quantize
# float Linear weights at load; None (the default) keeps a checkpoint as stored, a GGUF
# quantized.
QUANTIZATIONS = ("none", "int8", "int4", "int4_g32")

# "cpu" (native C++ kernel, CPU default) | "pallas" (GPU/TPU default) | "reference" (jnp);
# the one list of names: EngineConfig checks it and `jaxserve serve` offers it.
ATTENTION_BACKENDS = ("reference", "pallas", "cpu")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # jaxserve/reasoning.py's, by name
# Where the weights come from: "auto" (the checkpoint's files) | "dummy" (random, generated
# on the devices from config.json alone: benchmarks without weight files).
LOAD_FORMATS = ("auto", "dummy")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything one engine is built from; the parts agree with each other."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    attention_backend: str = _rule(dataclasses.MISSING, f"one of {ATTENTION_BACKENDS}",
                                   ATTENTION_BACKENDS.__contains__)
    seed: int = _rule(0, "an integer", _is_int)  # of requests that bring none
    load_format: str = _rule("auto", f"one of {LOAD_FORMATS}", LOAD_FORMATS.__contains__)
    # Devices the model is sharded over ("model" mesh axis).
    tensor_parallel_size: int = _rule(1, "an integer >= 1", _at_least(1))
    # MoE expert stacks shard on E over the "model" axis (vLLM's enable_expert_parallel)
    # instead of on their MLP width; the model config is built with this layout.
    enable_expert_parallel: bool = _rule(False, "True or False", _is_bool)
    # Linear weights: None as the checkpoint stores them (a GGUF stays quantized), "none"
    # all float, "int8" (per channel) / "int4" (grouped) quantized at load (vLLM's name).
    quantization: str | None = _rule(None, f"None or one of {QUANTIZATIONS}",
                                     lambda v: v is None or v in QUANTIZATIONS)
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache; None = off
    # Prompts are token ids and outputs carry no text.
    skip_tokenizer_init: bool = _rule(False, "True or False", _is_bool)
    # Serve once the smallest buckets are compiled and compile the others in a background
    # thread (steps stay inside what is compiled meanwhile); False: all before serving.
    background_compilation: bool = _rule(True, "True or False", _is_bool)
    # The outputs' think block syntax: a request's grammar applies after it (the answer).
    reasoning_parser: str | None = _rule(None, f"None or one of {REASONING_PARSERS}",
                                         _none_or(REASONING_PARSERS.__contains__))

    def __post_init__(self) -> None:
        _check_rules(self)
        sched_len, model_len = self.scheduler_config.max_model_len, self.model_config.max_model_len
        if sched_len != model_len:
            raise ValueError(f"EngineConfig.scheduler_config.max_model_len must be equal to "
                             f"model_config.max_model_len={model_len}, got {sched_len}")
        if (self.model_config.kv_latent_dim is not None
                and self.cache_config.kv_cache_dtype != "auto"):
            raise ValueError(f"EngineConfig.cache_config.kv_cache_dtype must be 'auto' for an "
                             f"MLA model ({self.model_config.architecture}: its latent pool "
                             f"is not quantized), got {self.cache_config.kv_cache_dtype!r}")
        if self.model_config.enable_expert_parallel != self.enable_expert_parallel:
            object.__setattr__(self, "model_config", dataclasses.replace(
                self.model_config, enable_expert_parallel=self.enable_expert_parallel))
        if self.model_config.quantization != self.quantization:
            object.__setattr__(self, "model_config", dataclasses.replace(
                self.model_config, quantization=self.quantization))
