"""Each kernel still lowers for its hardware: `jax.export` on CPU at real model shapes.

This runs the Pallas Triton and Mosaic lowerings (the Triton IR or the Mosaic module is
built and embedded in the exported StableHLO); the final compile needs the device.
"""

import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.ragged_paged_attention import gpu, kv_pool_shape, kv_quant, tpu

TRITON_CALL = "__gpu$xla.gpu.triton"
# name: (q heads, kv heads, head dim)
MODELS = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128)}
# name: (T token bucket, B seq bucket, pages per seq)
BUCKETS = {"decode": (64, 64, 64), "mixed": (512, 16, 128)}


def _abstract_args(model: str, bucket: str, dtype=jnp.bfloat16, page_size: int = 16):
    num_heads, num_kv_heads, head_dim = MODELS[model]
    num_tokens, num_seqs, pages_per_seq = BUCKETS[bucket]
    pool = jax.ShapeDtypeStruct(kv_pool_shape(num_kv_heads, 4096, page_size, head_dim), dtype)
    return (jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), dtype), pool, pool,
            jax.ShapeDtypeStruct((num_seqs, pages_per_seq), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32))


def _export(kernel, platform: str, args, **kwargs) -> str:
    fn = jax.jit(lambda *a: kernel(*a, sm_scale=128 ** -0.5, **kwargs))
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    exported = export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
    assert exported.out_avals[0].shape == args[0].shape
    return exported.mlir_module()


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("model", list(MODELS))
def test_gpu_kernel_lowers_for_cuda(model, bucket):
    assert TRITON_CALL in _export(gpu.ragged_paged_attention, "cuda",
                                  _abstract_args(model, bucket))


@pytest.mark.parametrize("num_splits", [1, 8])
def test_gpu_kernel_lowers_for_cuda_with_and_without_splits(num_splits):
    args = _abstract_args("qwen2.5-7b", "decode", dtype=jnp.float32, page_size=32)
    assert TRITON_CALL in _export(gpu.ragged_paged_attention, "cuda", args,
                                  num_splits=num_splits, sliding_window=256, soft_cap=30.0)


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("model", list(MODELS))
def test_tpu_kernel_lowers_for_tpu(model, bucket):
    assert "tpu_custom_call" in _export(tpu.ragged_paged_attention, "tpu",
                                        _abstract_args(model, bucket))


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_tpu_kernel_lowers_for_tpu_at_each_page_size(page_size):
    args = _abstract_args("qwen2.5-1.5b", "decode", dtype=jnp.float32, page_size=page_size)
    assert "tpu_custom_call" in _export(tpu.ragged_paged_attention, "tpu", args,
                                        sliding_window=256, soft_cap=30.0)


def test_kernels_with_alibi_slopes_lower_for_cuda_and_tpu():
    args = _abstract_args("qwen2.5-1.5b", "mixed") + (jax.ShapeDtypeStruct((12,), jnp.float32),)

    def with_alibi(kernel):
        return lambda *a, **kw: kernel(*a[:-1], alibi_slopes=a[-1], **kw)

    assert TRITON_CALL in _export(with_alibi(gpu.ragged_paged_attention), "cuda", args)
    assert "tpu_custom_call" in _export(with_alibi(tpu.ragged_paged_attention), "tpu", args)


def test_gpu_kernel_float32_dots_are_ieee_not_tf32(monkeypatch):
    """Triton runs a float32 dot at DEFAULT precision as TF32 (~1e-3 error, seen on H100)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def recording_lower(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(str(result.module))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", recording_lower)
    args = _abstract_args("qwen2.5-1.5b", "decode", dtype=jnp.float32)
    _export(gpu.ragged_paged_attention, "cuda", args)
    dots = [line for module in modules for line in module.splitlines() if "tt.dot" in line]
    assert len(dots) == 2 and not any("tf32" in line for line in dots), dots


@pytest.mark.parametrize("kv_dtype", [
    jnp.float8_e4m3fn, pytest.param(jnp.int8, marks=pytest.mark.slow)])
def test_kernels_with_8_bit_pools_lower_for_cuda_and_tpu(kv_dtype):
    q, pool, _, *tables = _abstract_args("qwen2.5-1.5b", "mixed", page_size=32)
    pool = jax.ShapeDtypeStruct(pool.shape, kv_dtype)
    scales = jax.ShapeDtypeStruct(kv_quant.scale_pool_shape(*pool.shape[:3]),
                                  kv_quant.SCALE_DTYPE)
    args = (q, pool, pool, *tables, scales, scales)

    def with_scales(kernel):
        return lambda *a, **kw: kernel(*a[:-2], k_scales=a[-2], v_scales=a[-1], **kw)

    assert TRITON_CALL in _export(with_scales(gpu.ragged_paged_attention), "cuda", args)
    assert "tpu_custom_call" in _export(with_scales(tpu.ragged_paged_attention), "tpu", args)
