"""The Pallas kernels under `shard_map` over the model axis still lower for their hardware.

`jax.export` on CPU with a 2 x 4 ("data", "model") abstract mesh: each shard sees 1/4 of
the query heads and of the KV heads, and the exported module holds the manual computation
and the Triton (cuda) or Mosaic (tpu) custom call; the final compile needs the device.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.parallel.tensor_parallel import shard_over_heads
from pallas_kernels.ragged_paged_attention import gpu, kv_pool_shape, tpu

TRITON_CALL = "__gpu$xla.gpu.triton"
KERNELS = {"cuda": (gpu.ragged_paged_attention, TRITON_CALL),
           "tpu": (tpu.ragged_paged_attention, "tpu_custom_call")}
# Heads that split over 4 model ranks: 16 query heads, 4 KV heads of dim 128.
NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_SEQS, PAGES_PER_SEQ = 64, 16, 4, 128, 8, 16


def _abstract_args(dtype=jnp.bfloat16):
    pool = jax.ShapeDtypeStruct(kv_pool_shape(NUM_KV_HEADS, 256, 16, HEAD_DIM), dtype)
    return (jax.ShapeDtypeStruct((NUM_TOKENS, NUM_HEADS, HEAD_DIM), dtype), pool, pool,
            jax.ShapeDtypeStruct((NUM_SEQS, PAGES_PER_SEQ), jnp.int32),
            jax.ShapeDtypeStruct((NUM_SEQS,), jnp.int32),
            jax.ShapeDtypeStruct((NUM_SEQS + 1,), jnp.int32))


@pytest.mark.parametrize("platform", list(KERNELS))
def test_kernel_under_shard_map_lowers_on_a_2x4_mesh(platform):
    kernel, custom_call = KERNELS[platform]
    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    shard_shapes = []

    def per_shard(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc):
        shard_shapes.append((q.shape, k_pages.shape))
        return kernel(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc,
                      sm_scale=HEAD_DIM ** -0.5)

    specs = (P(None, "model", None), P("model"), P("model"), P(), P(), P())
    sharded = shard_over_heads(per_shard, num_head_args=1, num_pool_args=2, num_outputs=1,
                               pool_outputs=False)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    with jax.sharding.use_abstract_mesh(mesh):
        fn = jax.jit(sharded, in_shardings=tuple(NamedSharding(mesh, s) for s in specs))
        exported = export.export(fn, platforms=[platform], disabled_checks=checks)(
            *_abstract_args())
    module = exported.mlir_module()
    assert exported.nr_devices == 8
    assert exported.out_avals[0].shape == (NUM_TOKENS, NUM_HEADS, HEAD_DIM)
    assert shard_shapes == [((NUM_TOKENS, NUM_HEADS // 4, HEAD_DIM),
                             (NUM_KV_HEADS // 4, 256, 16, HEAD_DIM))]
    assert "manual_computation" in module and custom_call in module
