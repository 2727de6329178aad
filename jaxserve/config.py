"""Frozen configuration dataclasses, validated once at construction.

Each class names the parameter and the allowed range in its errors. Derived numbers
(block counts, bucket ladders) live on the objects that derive them, never here.
This module must stay importable without jax or transformers at import time:
`jaxserve.core` reads the scheduler and cache configs from it.
"""

from __future__ import annotations

import dataclasses
import functools
import os


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
    # MoE expert stacks shard on E over the "model" mesh axis (vLLM's enable_expert_parallel)
    # instead of on their MLP width; the loader's rules and the MoE block both read it.
    enable_expert_parallel: bool = False
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
        _model_check(isinstance(self.enable_expert_parallel, bool), "enable_expert_parallel",
                     "a bool", self.enable_expert_parallel)
        _model_check(len(self.layer_sliding_windows) == self.num_layers, "layer_sliding_windows",
                     f"one entry per layer ({self.num_layers})", self.layer_sliding_windows)
        _model_check_rope_scaling(self.rope_scaling)

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
        from jaxserve.model.gguf_reader import find_gguf_file, gguf_hf_config
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



# --- CacheConfig and SchedulerConfig -----------------------------------------------------

_SCHEDULER_POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is cut up and sized; the runner derives the block count L."""

    block_size: int = 16  # S: tokens per KV block; a power of two in [1, 256]
    enable_prefix_caching: bool = True  # share full blocks between requests by content hash
    num_gpu_blocks_override: int | None = None  # L (null block included); None = from memory
    gpu_memory_utilization: float = 0.9  # (0, 1]: share of device memory the engine may use
    kv_cache_memory_bytes: int | None = None  # explicit KV budget in bytes (CPU); None = derive

    def __post_init__(self) -> None:
        check = functools.partial(_check_config_field, "CacheConfig")
        size = self.block_size
        check(_is_plain_int(size) and 1 <= size <= 256 and size & (size - 1) == 0,
              "block_size", "a power of two in [1, 256]", size)
        check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "a bool",
              self.enable_prefix_caching)
        override = self.num_gpu_blocks_override
        check(override is None or (_is_plain_int(override) and override >= 2),
              "num_gpu_blocks_override", "None or an integer >= 2", override)
        utilization = self.gpu_memory_utilization
        check(isinstance(utilization, (int, float)) and not isinstance(utilization, bool)
              and 0 < utilization <= 1, "gpu_memory_utilization", "in (0, 1]", utilization)
        memory = self.kv_cache_memory_bytes
        check(memory is None or (_is_plain_int(memory) and memory > 0),
              "kv_cache_memory_bytes", "None or a positive integer", memory)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's budgets and policy; read once, never written back."""

    max_num_batched_tokens: int = 2048  # T budget: tokens computed per step, before padding
    max_num_seqs: int = 256  # B budget: requests running at once
    max_model_len: int = 2048  # prompt + output cap in tokens (ModelConfig.max_model_len)
    # Most tokens one request may compute per step, so that a long prompt is chunked and
    # does not starve the others; 0 = only the step budget limits it.
    long_prefill_token_threshold: int = 0
    policy: str = "fcfs"  # "fcfs" | "priority" (lower Request.priority first)
    max_num_waiting: int | None = None  # add_request refuses beyond this many; None = no cap
    # Plan step N+1 while step N computes (Scheduler.schedule(ahead=True)), so the host's
    # scheduling and input work overlaps the devices'; off: each step waits for the last.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        check = functools.partial(_check_config_field, "SchedulerConfig")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            check(_is_plain_int(value) and value >= 1, name, "an integer >= 1", value)
        threshold = self.long_prefill_token_threshold
        check(_is_plain_int(threshold) and threshold >= 0, "long_prefill_token_threshold",
              "an integer >= 0 (0 = off)", threshold)
        check(self.policy in _SCHEDULER_POLICIES, "policy", f"one of {_SCHEDULER_POLICIES}",
              self.policy)
        waiting = self.max_num_waiting
        check(waiting is None or (_is_plain_int(waiting) and waiting >= 1), "max_num_waiting",
              "None or an integer >= 1", waiting)
        check(isinstance(self.async_scheduling, bool), "async_scheduling", "True or False",
              self.async_scheduling)


def _is_plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config_field(cls_name: str, ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{name} must be {expected}, got {value!r}")


# --- EngineConfig ------------------------------------------------------------------------

_ATTENTION_BACKENDS = ("reference", "pallas", "cpu")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything one engine is built from; the parts agree with each other."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    # "cpu" (native C++ kernel, CPU default) | "pallas" (GPU/TPU default) | "reference" (jnp)
    attention_backend: str
    seed: int = 0  # seeds of requests that bring none are drawn from this
    tensor_parallel_size: int = 1  # devices the model is sharded over ("model" mesh axis)
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache; None = off
    skip_tokenizer_init: bool = False  # prompts are token ids and outputs carry no text
    # Serve once the smallest buckets are compiled and compile the others in a background
    # thread (steps stay inside what is compiled meanwhile); False: all before serving.
    background_compilation: bool = True

    def __post_init__(self) -> None:
        check = functools.partial(_check_config_field, "EngineConfig")
        check(self.attention_backend in _ATTENTION_BACKENDS, "attention_backend",
              f"one of {_ATTENTION_BACKENDS}", self.attention_backend)
        check(_is_plain_int(self.seed), "seed", "an integer", self.seed)
        tp = self.tensor_parallel_size
        check(_is_plain_int(tp) and tp >= 1, "tensor_parallel_size", "an integer >= 1", tp)
        check(isinstance(self.background_compilation, bool), "background_compilation",
              "True or False", self.background_compilation)
        sched_len, model_len = self.scheduler_config.max_model_len, self.model_config.max_model_len
        check(sched_len == model_len, "scheduler_config.max_model_len",
              f"equal to model_config.max_model_len={model_len}", sched_len)
