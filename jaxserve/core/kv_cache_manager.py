"""KV cache manager: each request's block table, on top of the block pool.

The scheduler asks `get_computed_blocks` for a waiting request's longest cached prefix,
then `allocate_slots` for the blocks its next tokens need (`None`: not enough free blocks,
and nothing changed; the scheduler owns the policy), and `free` when it is done or
preempted. Full blocks are registered in the prefix cache by the allocation of the step
that computes them, so a request admitted later in the same step shares them: safe because
each attention layer writes the step's new K/V into the pool before it attends.
"""

from __future__ import annotations

import dataclasses

from .block_pool import ROOT_CACHE_ID, BlockPool, KVCacheBlock
from ..request import Request


@dataclasses.dataclass(frozen=True, slots=True)
class KVCacheBlocks:
    """Blocks handed across the manager/scheduler line (a hit, or a new allocation)."""

    blocks: tuple[KVCacheBlock, ...]  # in block-table order

    def get_block_ids(self) -> tuple[int, ...]:
        return tuple(block.block_id for block in self.blocks) if self.blocks else ()

    def __len__(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    """Owns the block pool and every running request's block table."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size  # S, tokens per block
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._req_to_blocks: dict[str, list[KVCacheBlock]] = {}  # request id -> block table
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already offered to the cache
        self._empty = KVCacheBlocks(())
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up (caching on)
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    @property
    def usage(self) -> float:
        """Fraction of the non-null blocks in use."""
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """The longest cached prefix of the request: (blocks, number of tokens they hold).

        Never covers the last token (its logits must be computed), and is empty when the
        request asks for prompt logprobs (they need every prompt position computed).
        Changes nothing: the hit is claimed by `allocate_slots`.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return self._empty, 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        get_cached_block = self.block_pool.get_cached_block
        hits: list[KVCacheBlock] = []
        parent_cache_id = ROOT_CACHE_ID
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = get_cached_block(block_hash, parent_cache_id)
            if block is None:
                break
            hits.append(block)
            parent_cache_id = block.cache_id
        if not hits:
            return self._empty, 0
        return KVCacheBlocks(tuple(hits)), len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: KVCacheBlocks | None = None,
                       num_new_computed_tokens: int = 0) -> KVCacheBlocks | None:
        """Grows the request's table to hold its computed tokens, a prefix hit and
        `num_new_tokens` more; returns the newly allocated blocks, or None (nothing
        changed) if the pool is short. Passing `new_computed_blocks` (possibly empty)
        marks an admission: the prefix-cache counters count it."""
        request_id = request.request_id
        table = self._req_to_blocks.get(request_id)
        hit = new_computed_blocks.blocks if new_computed_blocks is not None else ()
        num_tokens_after = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_held = len(table) if table is not None else 0
        num_needed = -(-num_tokens_after // self.block_size) - num_held - len(hit)
        if num_needed > 0 or hit:
            num_revived = sum(1 for block in hit if block.ref_cnt == 0)
            if num_needed > self.block_pool.num_free_blocks - num_revived:
                return None
        if table is None:
            table = self._req_to_blocks[request_id] = []
            self._num_cached_blocks[request_id] = 0
        if hit:
            self.block_pool.touch(hit)
            table.extend(hit)
            self._num_cached_blocks[request_id] = len(table)
        new_blocks = self._empty
        if num_needed > 0:
            new_blocks = KVCacheBlocks(tuple(self.block_pool.get_new_blocks(num_needed)))
            table.extend(new_blocks.blocks)
        if new_computed_blocks is not None and self.enable_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        if self.enable_caching:
            # Full once this step runs; block_hashes covers every full block of known tokens.
            num_full_blocks = min(num_tokens_after // self.block_size, len(request.block_hashes))
            if num_full_blocks > self._num_cached_blocks[request_id]:
                self._cache_full_blocks(request, table, num_full_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Returns the request's blocks to the pool, tail first so a prefix outlives its
        tail in the cache. A no-op for a request holding none."""
        table = self._req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.block_pool.free_blocks(reversed(table))

    def get_block_ids(self, request_id: str) -> tuple[int, ...]:
        """The request's block table as block ids ([] when it holds none)."""
        return tuple(block.block_id for block in self._req_to_blocks.get(request_id, ()))

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; only possible when no request holds blocks."""
        return self.block_pool.reset_prefix_cache()

    def _cache_full_blocks(self, request: Request, table: list[KVCacheBlock],
                           num_full_blocks: int) -> None:
        """Offers table blocks [offered so far, num_full_blocks) to the prefix cache."""
        request_id = request.request_id
        for i in range(self._num_cached_blocks[request_id], num_full_blocks):
            parent_cache_id = ROOT_CACHE_ID if i == 0 else table[i - 1].cache_id
            if parent_cache_id is None:  # the block before it could not be cached
                break
            self.block_pool.cache_block(table[i], request.block_hashes[i], parent_cache_id)
        self._num_cached_blocks[request_id] = num_full_blocks
