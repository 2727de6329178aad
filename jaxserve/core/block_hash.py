"""Chained hashes of full KV blocks: the keys of the prefix cache.

Block i of a request is keyed by hash(key of block i-1, its S token ids, extra keys), so a
key names a whole prefix, not just one block's tokens. Extra keys (the cache salt) enter
the first block and the chain carries them on. Hashes are computed incrementally, once per
block, as the request's tokens fill it. A `BlockHash` keeps its token ids so that a cache
hit is verified token for token: a hash collision can never change a request's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

_ROOT_SEED = 0x6A78_7365_7276_65  # the "parent hash" of every first block


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHash:
    """The cache key of one full block and what a hit must match exactly."""

    value: int  # chained hash: hash((parent value, token_ids, extra_keys)); the dict key
    token_ids: tuple[int, ...]  # [S] the block's tokens, compared on every hit
    extra_keys: tuple[Hashable, ...] | None  # e.g. (cache_salt,); first block only


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...],
               extra_keys: tuple[Hashable, ...] | None = None) -> BlockHash:
    """The key of a block whose predecessor has key `parent` (None for the first block)."""
    parent_value = _ROOT_SEED if parent is None else parent.value
    return BlockHash(hash((parent_value, token_ids, extra_keys)), token_ids, extra_keys)


def extra_keys_of(cache_salt: str | None) -> tuple[Hashable, ...] | None:
    """Extra keys of a request's first block: requests with different salts never share."""
    return None if cache_salt is None else (cache_salt,)


def append_block_hashes(block_hashes: list[BlockHash], token_ids: Sequence[int],
                        block_size: int, extra_keys: tuple[Hashable, ...] | None) -> None:
    """Extends `block_hashes` to one key per full block of `token_ids`.

    Cheap when no block filled since the last call (one length check), so the scheduler
    calls it after every append.
    """
    num_full_blocks = len(token_ids) // block_size
    num_hashed = len(block_hashes)
    if num_full_blocks <= num_hashed:
        return
    parent = block_hashes[-1] if block_hashes else None
    for i in range(num_hashed, num_full_blocks):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = hash_block(parent, tokens, extra_keys if i == 0 else None)
        block_hashes.append(parent)
