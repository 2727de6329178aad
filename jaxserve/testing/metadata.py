"""AttentionMetadata for tests of layers that never attend (MLPs, MoE blocks): one sequence
whose tokens are all real, so every op computes every row."""

import jax.numpy as jnp

from jaxserve.model.attention_metadata import AttentionMetadata


def one_sequence(num_tokens: int, block_size: int = 16) -> AttentionMetadata:
    """T = `num_tokens` real tokens of one sequence, laid out in blocks 1, 2, ..."""
    blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        slot_mapping=jnp.arange(num_tokens, dtype=jnp.int32) + block_size,  # [T]
        block_tables=jnp.arange(1, blocks + 1, dtype=jnp.int32)[None],  # [1, blocks]
        seq_lens=jnp.asarray([num_tokens], jnp.int32),  # [1]
        query_start_loc=jnp.asarray([0, num_tokens], jnp.int32),  # [2]
        logits_indices=jnp.asarray([num_tokens - 1], jnp.int32))  # [1]
