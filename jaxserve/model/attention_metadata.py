"""AttentionMetadata: where one step's tokens live in the KV block pool.

The runner builds it on the host from the scheduler's output, padded to the step's bucket
(T tokens, B sequences), and hands it to the jitted forward as a pytree of int32 arrays.
Padding follows one rule: padding tokens write into the null block 0, padding sequences
have no queries and a zero length, and padded block-table entries point at block 0.
"""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step positions of tokens and sequences in the paged KV cache."""

    # [T] int32: flat slot of each token's K/V, block_id * S + offset in block; padding
    # tokens use slots 0..S-1 of the null block 0.
    slot_mapping: jax.Array
    # [B, max_blocks] int32: each sequence's block ids in context order; padding -> 0.
    block_tables: jax.Array
    # [B] int32: context length of each sequence including this step's tokens; 0 for padding.
    seq_lens: jax.Array
    # [B+1] int32: first token of each sequence in T; padding sequences have zero queries.
    query_start_loc: jax.Array
    # [B] int32: index in T of each sequence's last scheduled token (its logits); padding -> 0.
    logits_indices: jax.Array

    def num_tokens(self) -> jax.Array:  # [] int32
        """The step's real tokens, T before padding: padding sequences have no queries, so
        `query_start_loc` ends at it. Linear layers pass it to `Ops.dense`, whose native GEMM
        computes only these rows."""
        return self.query_start_loc[-1]
