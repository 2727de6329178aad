"""One place that turns user-facing engine options into a validated `EngineConfig`.

Both the offline `LLM` and `jaxserve serve` call `create_engine_config` with the same
vLLM-named options, so defaults and checks cannot drift apart. It also applies the
preferred XLA:CPU flags, which must happen before JAX creates its CPU client.
"""

from __future__ import annotations

import logging

from jaxserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxserve.runner.cpu_flags import apply_preferred_cpu_flags

logger = logging.getLogger(__name__)

# With no explicit budget, a step computes at most this many tokens (vLLM's chunked-prefill
# default), never more than the context.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def default_attention_backend() -> str:
    """"pallas" on GPU/TPU; on CPU the native kernel, or the reference where it does not build."""
    import jax

    if jax.default_backend() != "cpu":
        return "pallas"
    from pallas_kernels.ragged_paged_attention import cpu

    if cpu.available():  # a failed build logs its reason (no compiler, or its errors)
        return "cpu"
    logger.warning("the native CPU attention kernel is unavailable (see the warning above): "
                   "using the slower pure-jnp reference")
    return "reference"


def create_engine_config(model: str, *, dtype: str = "auto", seed: int = 0,
                         block_size: int = 16, max_model_len: int | None = None,
                         max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                         enable_prefix_caching: bool = True,
                         num_gpu_blocks_override: int | None = None,
                         kv_cache_memory_bytes: int | None = None,
                         gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                         attention_backend: str | None = None,
                         skip_tokenizer_init: bool = False,
                         compilation_cache_dir: str | None = None,
                         long_prefill_token_threshold: int = 0,
                         scheduling_policy: str = "fcfs",
                         max_num_waiting: int | None = None,
                         enable_expert_parallel: bool = False,
                         async_scheduling: bool = True,
                         background_compilation: bool = True) -> EngineConfig:
    """Reads the model's config and builds every part; ValueError names a bad option."""
    apply_preferred_cpu_flags()
    model_config = ModelConfig.from_pretrained(model, dtype=dtype, max_model_len=max_model_len,
                                               cache_dir=compilation_cache_dir)
    if isinstance(tensor_parallel_size, int) and tensor_parallel_size > 1:
        import jax

        from jaxserve.parallel.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(model_config.num_heads, model_config.num_kv_heads,
                              tensor_parallel_size)
        if tensor_parallel_size > len(jax.devices()):
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} exceeds the "
                             f"{len(jax.devices())} devices")
    max_len = model_config.max_model_len
    if max_num_batched_tokens is None:
        max_num_batched_tokens = min(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_len)
    return EngineConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=block_size,
                                 enable_prefix_caching=enable_prefix_caching,
                                 num_gpu_blocks_override=num_gpu_blocks_override,
                                 gpu_memory_utilization=gpu_memory_utilization,
                                 kv_cache_memory_bytes=kv_cache_memory_bytes),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            max_model_len=max_len, long_prefill_token_threshold=long_prefill_token_threshold,
            policy=scheduling_policy, max_num_waiting=max_num_waiting,
            async_scheduling=async_scheduling),
        attention_backend=attention_backend or default_attention_backend(), seed=seed,
        tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel,
        compilation_cache_dir=compilation_cache_dir,
        skip_tokenizer_init=skip_tokenizer_init, background_compilation=background_compilation)
