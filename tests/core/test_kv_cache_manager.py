"""The KV cache manager: block tables, prefix hits, None on exhaustion, counters."""

import pytest

from jaxserve.core.block_hash import append_block_hashes, extra_keys_of
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _request(req_id, tokens, **params):
    request = Request(req_id, tokens, SamplingParams(**params))
    append_block_hashes(request.block_hashes, request.all_token_ids, BLOCK_SIZE,
                        extra_keys_of(request.cache_salt))
    return request


def _admit(manager, request, num_new_tokens=None):
    """What the scheduler does for a waiting request: hit, then allocate the rest."""
    hit, num_hit = manager.get_computed_blocks(request)
    num_new = request.num_tokens - num_hit if num_new_tokens is None else num_new_tokens
    blocks = manager.allocate_slots(request, num_new, hit, num_hit)
    if blocks is not None:
        request.num_computed_tokens = num_hit + num_new
    return blocks


def _snapshot(manager):
    pool = manager.block_pool
    return ([b.block_id for b in pool.free_queue], [b.ref_cnt for b in pool.blocks],
            dict(pool.cached_blocks), manager.prefix_cache_queries, manager.prefix_cache_hits)


def test_allocate_slots_rounds_up_to_whole_blocks():
    manager = KVCacheManager(8, BLOCK_SIZE)
    request = _request("a", range(9))
    assert len(manager.allocate_slots(request, 9)) == 3
    assert manager.get_block_ids("a") == (1, 2, 3)


def test_a_decode_allocates_a_block_only_when_the_last_one_is_full():
    manager = KVCacheManager(8, BLOCK_SIZE)
    request = _request("a", range(7))
    _admit(manager, request)
    request.append_output_token_ids(100)
    assert len(manager.allocate_slots(request, 1)) == 0  # position 7 fits block 2
    request.num_computed_tokens += 1
    request.append_output_token_ids(101)
    assert manager.allocate_slots(request, 1).get_block_ids() == (3,)


def test_exhaustion_returns_none_and_leaves_every_count_unchanged():
    manager = KVCacheManager(5, BLOCK_SIZE)
    _admit(manager, _request("a", range(9)))  # 3 of the 4 blocks
    before = _snapshot(manager)
    assert _admit(manager, _request("b", range(50, 59))) is None
    assert _snapshot(manager) == before
    assert manager.get_block_ids("b") == ()


def test_exhaustion_counts_revived_hit_blocks_as_taken():
    manager = KVCacheManager(5, BLOCK_SIZE)  # 4 usable blocks
    first = _request("a", range(13))
    _admit(manager, first)
    manager.free(first)  # 4 free blocks, 3 of them cached
    longer = _request("b", list(range(13)) + [20] * 7)  # hits 3, needs 2 more: only 1 left
    before = _snapshot(manager)
    assert _admit(manager, longer) is None
    assert _snapshot(manager) == before


def test_free_returns_a_table_tail_first():
    manager = KVCacheManager(5, BLOCK_SIZE)
    request = _request("a", range(16))
    _admit(manager, request)
    manager.free(request)
    assert [b.block_id for b in manager.block_pool.free_queue] == [4, 3, 2, 1]


def test_a_second_request_with_the_same_prompt_hits_its_full_blocks():
    manager = KVCacheManager(10, BLOCK_SIZE)
    first = _request("a", range(10))
    _admit(manager, first)
    second = _request("b", range(10))
    hit, num_hit = manager.get_computed_blocks(second)
    assert num_hit == 8 and hit.get_block_ids() == manager.get_block_ids("a")[:2]


def test_a_hit_never_covers_the_last_prompt_token():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", range(8)))
    _, num_hit = manager.get_computed_blocks(_request("b", range(8)))
    assert num_hit == 4  # two full blocks match, but position 7's logits are needed


def test_a_hit_stops_at_the_first_block_that_differs():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", list(range(12)) + [0]))
    other = _request("b", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 0])
    _, num_hit = manager.get_computed_blocks(other)
    assert num_hit == 4


def test_blocks_of_a_finished_request_stay_hittable_until_reused():
    manager = KVCacheManager(10, BLOCK_SIZE)
    first = _request("a", range(9))
    _admit(manager, first)
    manager.free(first)
    _, num_hit = manager.get_computed_blocks(_request("b", range(9)))
    assert num_hit == 8


def test_a_shared_block_is_counted_once_per_holding_table():
    manager = KVCacheManager(10, BLOCK_SIZE)
    requests = [_request(name, range(9)) for name in "abc"]
    for request in requests:
        _admit(manager, request)
    shared = manager.block_pool.blocks[manager.get_block_ids("a")[0]]
    assert shared.ref_cnt == 3
    assert len({manager.get_block_ids(r.request_id)[2] for r in requests}) == 3  # own tails
    for request in requests:
        manager.free(request)
    assert shared.ref_cnt == 0 and manager.num_free_blocks == 9


def test_different_cache_salts_never_share_blocks():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", range(9)))
    salted = Request("b", list(range(9)), SamplingParams(), cache_salt="tenant")
    append_block_hashes(salted.block_hashes, salted.all_token_ids, BLOCK_SIZE,
                        extra_keys_of(salted.cache_salt))
    assert manager.get_computed_blocks(salted)[1] == 0


def test_a_request_asking_for_prompt_logprobs_gets_no_hit():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", range(9)))
    assert manager.get_computed_blocks(_request("b", range(9), prompt_logprobs=1))[1] == 0


def test_with_caching_disabled_nothing_is_cached_or_hit():
    manager = KVCacheManager(10, BLOCK_SIZE, enable_caching=False)
    _admit(manager, _request("a", range(9)))
    assert manager.get_computed_blocks(_request("b", range(9)))[1] == 0
    assert manager.block_pool.cached_blocks == {}


def test_only_blocks_full_after_the_step_are_cached():
    manager = KVCacheManager(10, BLOCK_SIZE)
    request = _request("a", range(12))
    _admit(manager, request, num_new_tokens=6)  # a chunk: block 0 full, block 1 half
    blocks = [manager.block_pool.blocks[i] for i in manager.get_block_ids("a")]
    assert [b.block_hash is not None for b in blocks] == [True, False]


def test_prefix_cache_counters_count_admitted_tokens():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", range(9)))
    _admit(manager, _request("b", range(9)))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (18, 8)


def test_get_computed_blocks_alone_counts_nothing():
    manager = KVCacheManager(10, BLOCK_SIZE)
    _admit(manager, _request("a", range(9)))
    manager.get_computed_blocks(_request("b", range(9)))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9, 0)


def test_usage_follows_allocation_and_free():
    manager = KVCacheManager(5, BLOCK_SIZE)
    request = _request("a", range(8))
    _admit(manager, request)
    assert manager.usage == pytest.approx(0.5)
    manager.free(request)
    assert manager.usage == 0.0


def test_reset_prefix_cache_forgets_hits_once_nothing_is_held():
    manager = KVCacheManager(10, BLOCK_SIZE)
    request = _request("a", range(9))
    _admit(manager, request)
    assert not manager.reset_prefix_cache()
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(_request("b", range(9)))[1] == 0
