"""The block pool: every KV block's bookkeeping, created once at start-up.

Block 0 is the null block (padding writes there) and is never handed out. The others carry
a ref count (how many block tables hold them) and, once full and cached, a `BlockHash`.
Free blocks wait in an intrusive doubly-linked queue, least recently freed first, so that a
cached block revived by a prefix hit leaves it in O(1). Cached blocks keep their hash while
free and lose it only when reused (lazy eviction); `None` means "not enough free blocks".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .block_hash import BlockHash

ROOT_CACHE_ID = 0  # the parent cache id of a request's first block; real ids start at 1
# A block's state in `BlockPool.block_states()`, ordered by how busy it is.
FREE, CACHED, USED, SHARED = 0, 1, 2, 3  # no table / free with a cached prefix / 1 / > 1 tables


class KVCacheBlock:
    """One block's metadata; the pool owns it, block tables refer to it."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "cache_id", "parent_cache_id",
                 "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id  # index into the device pools' L axis
        self.ref_cnt = 0  # number of block tables holding this block
        self.block_hash: BlockHash | None = None  # set while the block is in the prefix cache
        # Unique (never reused) id of this cache entry, and that of the block before it when
        # it was cached: a hit must chain to the entry it was computed after.
        self.cache_id: int | None = None
        self.parent_cache_id: int | None = None
        self.prev_free: KVCacheBlock | None = None  # free-queue links; None at the ends
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, cached={self.cache_id})"


class FreeBlockQueue:
    """Intrusive doubly-linked list of free blocks: O(1) pop, push at either end, remove."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self.head: KVCacheBlock | None = None  # next block handed out
        self.tail: KVCacheBlock | None = None  # most recently freed cached block
        self.num_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self.head
        if block is None:
            raise IndexError("pop from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        block.prev_free, block.next_free = self.tail, None
        if self.tail is None:
            self.head = block
        else:
            self.tail.next_free = block
        self.tail = block
        self.num_blocks += 1

    def appendleft(self, block: KVCacheBlock) -> None:
        block.prev_free, block.next_free = None, self.head
        if self.head is None:
            self.tail = block
        else:
            self.head.prev_free = block
        self.head = block
        self.num_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None:
            self.head = nxt
        else:
            prev.next_free = nxt
        if nxt is None:
            self.tail = prev
        else:
            nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_blocks -= 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self.head
        while block is not None:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_blocks


class BlockPool:
    """All blocks, their ref counts, the free queue and the hash -> cached block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"BlockPool.num_blocks must be >= 2 (the null block and one), got {num_blocks}")
        self.num_blocks = num_blocks  # L, the null block included
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]  # never freed, never handed out, never cached
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[int, KVCacheBlock] = {}  # BlockHash.value -> cached block
        self._next_cache_id = ROOT_CACHE_ID + 1
        # Free blocks that still hold a cached prefix (a hit revives them): kept as a count
        # so that the stats of every step read it in O(1).
        self.num_cached_free_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds, cached ones included (they are evicted on reuse)."""
        return self.free_queue.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of the non-null blocks held by some block table."""
        return 1.0 - self.free_queue.num_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock] | None:
        """Takes `num_blocks` from the head of the free queue (ref count 1), evicting any
        cached hash they kept; None, with nothing changed, if too few are free."""
        if num_blocks > self.free_queue.num_blocks:
            return None
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self.num_cached_free_blocks -= 1
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Adds a reference to each prefix-hit block, reviving free ones from the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
                if block.block_hash is not None:  # a hit revives a cached free block
                    self.num_cached_free_blocks -= 1
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference from each block, in eviction order (callers pass a table
        tail first). A block reaching zero joins the tail if cached (reused last, its hash
        still findable) and the head if not (nothing in it is worth keeping)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)
                    self.num_cached_free_blocks += 1

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash, parent_cache_id: int) -> bool:
        """Registers a full block under its hash. False if another entry owns the hash
        (a duplicate computed concurrently, or a collision): the block stays uncached."""
        if block.block_hash is not None or block_hash.value in self.cached_blocks:
            return False
        block.block_hash = block_hash
        block.cache_id = self._next_cache_id
        block.parent_cache_id = parent_cache_id
        self._next_cache_id += 1
        self.cached_blocks[block_hash.value] = block
        return True

    def get_cached_block(self, block_hash: BlockHash, parent_cache_id: int) -> KVCacheBlock | None:
        """The cached block with exactly these tokens after exactly this parent entry."""
        block = self.cached_blocks.get(block_hash.value)
        if block is None or block.parent_cache_id != parent_cache_id:
            return None
        if block.block_hash != block_hash:  # a hash collision: different tokens or salt
            return None
        return block

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only when no block is in use. True if it did."""
        if self.free_queue.num_blocks != self.num_blocks - 1:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = block.cache_id = block.parent_cache_id = None
        self.cached_blocks.clear()
        self.num_cached_free_blocks = 0
        return True

    def block_states(self) -> bytearray:
        """[L - 1] one state per non-null block, in block order (FREE, CACHED, USED or
        SHARED): the dashboard's block map. O(L); fine once a second, not every step."""
        return bytearray(SHARED if b.ref_cnt > 1 else USED if b.ref_cnt else
                         FREE if b.block_hash is None else CACHED for b in self.blocks[1:])

    def _evict(self, block: KVCacheBlock) -> None:
        if self.cached_blocks.get(block.block_hash.value) is block:
            del self.cached_blocks[block.block_hash.value]
        block.block_hash = block.cache_id = block.parent_cache_id = None
