"""Paged multi-head latent attention over one layer's latent pool.

The latent pool of one layer is `[L, S, C + Hr]` (`latent_pool_shape`): every query head
reads the same compressed latent, so under tensor parallelism the pool is replicated
(as in vLLM) and only the query heads split over the "model" axis. The model writes the
new rows with `Ops.write_rows` through `slot_mapping` (padding tokens land in the null
block 0); `mla_paged_attention` runs the latent reference, under `shard_map` over query
heads when the mesh has a "model" axis > 1.
"""

import jax
from jax.sharding import PartitionSpec as P

from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.parallel.tensor_parallel import MODEL_AXIS, model_axis_size
from pallas_kernels.mla_paged_attention import mla_paged_attention as latent_reference


def mla_paged_attention(q_latent,  # [T, N, C] queries times the absorbed W_UK
                        q_rope,    # [T, N, Hr] rotated RoPE queries
                        pool,      # [L, S, C + Hr] latent pool, this step's rows written
                        metadata: AttentionMetadata,
                        *,
                        sm_scale: float,
                        ) -> jax.Array:  # [T, N, C]; zero rows for padding tokens
    """Causal attention of each sequence's new tokens over its latent blocks."""
    def attend(q_latent, q_rope, pool, block_tables, seq_lens, query_start_loc):
        return latent_reference(q_latent, q_rope, pool, block_tables, seq_lens,
                                query_start_loc, sm_scale=sm_scale)

    if model_axis_size() > 1:
        heads = P(None, MODEL_AXIS, None)
        attend = jax.shard_map(attend, in_specs=(heads, heads, P(), P(), P(), P()),
                               out_specs=heads, check_vma=False)
    return attend(q_latent, q_rope, pool, metadata.block_tables, metadata.seq_lens,
                  metadata.query_start_loc)
