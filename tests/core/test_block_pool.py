"""The block pool: null block, free-queue order, ref counts, lazy eviction, exact hits."""

import random

import pytest

from jaxserve.core.block_hash import BlockHash, hash_block
from jaxserve.core.block_pool import (CACHED, FREE, ROOT_CACHE_ID, SHARED, USED, BlockPool,
                                      FreeBlockQueue, KVCacheBlock)


def _ids(blocks):
    return [block.block_id for block in blocks]


def _queue_ids(pool):
    return _ids(pool.free_queue)


def _cache(pool, block, tokens, parent=None):
    """Caches `block` as holding `tokens` after `parent` (None: a first block)."""
    block_hash = hash_block(parent.block_hash if parent else None, tuple(tokens))
    parent_cache_id = parent.cache_id if parent else ROOT_CACHE_ID
    assert pool.cache_block(block, block_hash, parent_cache_id)
    return block_hash


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert 0 not in _ids(pool.get_new_blocks(3))
    assert pool.get_new_blocks(1) is None


def test_a_fresh_pool_hands_out_blocks_in_id_order():
    assert _ids(BlockPool(6).get_new_blocks(5)) == [1, 2, 3, 4, 5]


def test_allocation_beyond_the_free_blocks_returns_none_and_changes_nothing():
    pool = BlockPool(5)
    pool.get_new_blocks(2)
    before = _queue_ids(pool)
    assert pool.get_new_blocks(3) is None
    assert _queue_ids(pool) == before and pool.num_free_blocks == 2


def test_freed_cached_blocks_join_the_tail_in_the_given_order():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    parent = None
    for i, block in enumerate(blocks[:3]):
        _cache(pool, block, [i], parent)
        parent = block
    pool.free_blocks(reversed(blocks[:3]))  # a table is freed tail first
    assert _queue_ids(pool) == [3, 2, 1]  # least recently freed first: the tail goes first


def test_freed_uncached_blocks_go_to_the_head_for_immediate_reuse():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    _cache(pool, blocks[0], [7])
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[1]])  # never filled: nothing worth keeping
    assert _queue_ids(pool) == [2, 4, 5, 1]
    assert _ids(pool.get_new_blocks(1)) == [2]


def test_a_shared_block_returns_to_the_queue_only_when_its_last_reference_drops():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    _cache(pool, block, [1])
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free_blocks([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 2


def test_touch_revives_a_free_cached_block_from_the_middle_of_the_queue():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        _cache(pool, block, [i])
    pool.free_blocks(blocks)
    pool.touch([blocks[1]])
    assert _queue_ids(pool) == [1, 3, 4]
    assert blocks[1].ref_cnt == 1 and pool.num_free_blocks == 3


def test_a_free_cached_block_keeps_its_hash_until_it_is_reused():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    block_hash = _cache(pool, block, [1, 2])
    pool.free_blocks([block])
    assert pool.get_cached_block(block_hash, ROOT_CACHE_ID) is block  # still findable
    pool.get_new_blocks(1)  # block 2, the head
    assert pool.get_cached_block(block_hash, ROOT_CACHE_ID) is block
    assert pool.get_new_blocks(1) == [block]  # reused now: evicted
    assert block.block_hash is None and block.cache_id is None
    assert pool.get_cached_block(block_hash, ROOT_CACHE_ID) is None


def test_a_hash_collision_with_different_tokens_is_a_miss():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    stored = _cache(pool, block, [1, 2])
    colliding = BlockHash(stored.value, (3, 4), None)
    assert pool.get_cached_block(colliding, ROOT_CACHE_ID) is None


def test_a_different_cache_salt_with_the_same_hash_is_a_miss():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    stored = _cache(pool, block, [1, 2])
    salted = BlockHash(stored.value, (1, 2), ("salt",))
    assert pool.get_cached_block(salted, ROOT_CACHE_ID) is None


def test_the_same_tokens_after_a_different_parent_entry_are_a_miss():
    pool = BlockPool(4)
    first, second = pool.get_new_blocks(2)
    _cache(pool, first, [1])
    child_hash = _cache(pool, second, [2], parent=first)
    assert pool.get_cached_block(child_hash, first.cache_id) is second
    assert pool.get_cached_block(child_hash, first.cache_id + 100) is None
    assert pool.get_cached_block(child_hash, ROOT_CACHE_ID) is None


def test_a_second_block_with_a_cached_hash_stays_uncached():
    pool = BlockPool(4)
    first, duplicate = pool.get_new_blocks(2)
    block_hash = _cache(pool, first, [5])
    assert not pool.cache_block(duplicate, block_hash, ROOT_CACHE_ID)
    assert duplicate.block_hash is None
    assert pool.get_cached_block(block_hash, ROOT_CACHE_ID) is first


def test_cache_ids_are_never_reused():
    pool = BlockPool(2)
    block = pool.get_new_blocks(1)[0]
    _cache(pool, block, [1])
    old_id = block.cache_id
    pool.free_blocks([block])
    block = pool.get_new_blocks(1)[0]
    _cache(pool, block, [1])
    assert block.cache_id != old_id


def test_reset_prefix_cache_is_refused_while_a_block_is_in_use():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    block_hash = _cache(pool, block, [1])
    assert not pool.reset_prefix_cache()
    pool.free_blocks([block])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(block_hash, ROOT_CACHE_ID) is None and block.block_hash is None


def test_usage_is_the_fraction_of_non_null_blocks_in_use():
    pool = BlockPool(5)
    assert pool.usage == 0.0
    pool.get_new_blocks(1)
    assert pool.usage == 0.25
    pool.get_new_blocks(3)
    assert pool.usage == 1.0


def test_a_pool_needs_the_null_block_and_one_more():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)


@pytest.mark.parametrize("position", [0, 2, 4])
def test_free_queue_removes_head_middle_and_tail_in_place(position):
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[position])
    assert _ids(queue) == [i for i in range(5) if i != position] and len(queue) == 4
    assert [b.block_id for b in reversed(list(queue))] == list(reversed(_ids(queue)))
    queue.appendleft(blocks[position])
    assert _ids(queue)[0] == position
    assert queue.popleft() is blocks[position]


def test_block_states_tell_free_cached_used_and_shared_blocks_apart():
    pool = BlockPool(6)
    a, b, c = pool.get_new_blocks(3)
    _cache(pool, a, [1])
    _cache(pool, b, [2])
    pool.touch([a])  # a second table holds a
    pool.free_blocks([b])  # b: free, its prefix kept
    assert list(pool.block_states()) == [SHARED, CACHED, USED, FREE, FREE]
    assert pool.num_cached_free_blocks == 1


@pytest.mark.parametrize("seed", range(5))
def test_the_cached_free_count_matches_the_blocks_after_random_operations(seed):
    """The O(1) count the step stats read equals a count over every block, whatever the
    mix of allocations, cachings, prefix hits, frees, evictions and resets."""
    rng = random.Random(seed)
    pool = BlockPool(12)
    tables: list[list[KVCacheBlock]] = []
    for token in range(400):
        action = rng.choice(["alloc", "alloc", "cache", "hit", "free", "reset"])
        if action == "alloc" and (blocks := pool.get_new_blocks(rng.randint(1, 3))):
            tables.append(blocks)
        elif action == "cache" and tables:
            block = rng.choice(rng.choice(tables))
            if block.block_hash is None:
                pool.cache_block(block, hash_block(None, (token,)), ROOT_CACHE_ID)
        elif action == "hit" and pool.cached_blocks:
            tables.append([rng.choice(list(pool.cached_blocks.values()))])
            pool.touch(tables[-1])
        elif action == "free" and tables:
            pool.free_blocks(reversed(tables.pop(rng.randrange(len(tables)))))
        elif action == "reset":
            pool.reset_prefix_cache()
        states = list(pool.block_states())
        assert pool.num_cached_free_blocks == states.count(CACHED)
        assert states.count(FREE) + states.count(CACHED) == pool.num_free_blocks
