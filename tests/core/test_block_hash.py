"""Chained block hashes: full blocks only, prefix-dependent, salted, incremental."""

from jaxserve.core.block_hash import append_block_hashes, extra_keys_of, hash_block


def _hashes(tokens, block_size=4, salt=None):
    hashes = []
    append_block_hashes(hashes, tokens, block_size, extra_keys_of(salt))
    return hashes


def test_only_full_blocks_are_hashed():
    assert len(_hashes(list(range(7)))) == 1
    assert len(_hashes(list(range(8)))) == 2
    assert _hashes([1, 2, 3]) == []


def test_a_block_hash_keeps_the_block_token_ids():
    assert [h.token_ids for h in _hashes(list(range(8)))] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_equal_prefixes_give_equal_hashes():
    assert _hashes([1, 2, 3, 4, 5, 6, 7, 8]) == _hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])


def test_the_same_block_after_a_different_prefix_hashes_differently():
    first = _hashes([1, 1, 1, 1, 5, 6, 7, 8])
    second = _hashes([2, 2, 2, 2, 5, 6, 7, 8])
    assert first[1].token_ids == second[1].token_ids
    assert first[1].value != second[1].value


def test_the_chain_links_each_block_to_its_parent():
    hashes = _hashes(list(range(8)))
    assert hashes[0] == hash_block(None, (0, 1, 2, 3))
    assert hashes[1] == hash_block(hashes[0], (4, 5, 6, 7))


def test_a_cache_salt_changes_every_block_hash():
    plain = _hashes(list(range(12)))
    salted = _hashes(list(range(12)), salt="tenant-a")
    assert all(p.value != s.value for p, s in zip(plain, salted))
    assert salted[0].extra_keys == ("tenant-a",) and salted[1].extra_keys is None
    assert _hashes(list(range(12)), salt="tenant-b")[2].value != salted[2].value


def test_incremental_hashing_equals_hashing_all_at_once():
    tokens = list(range(23))
    incremental = []
    for end in range(len(tokens) + 1):
        append_block_hashes(incremental, tokens[:end], 4, None)
    assert incremental == _hashes(tokens)


def test_hashing_again_without_new_full_blocks_changes_nothing():
    hashes = _hashes(list(range(9)))
    before = list(hashes)
    append_block_hashes(hashes, list(range(11)), 4, None)
    assert hashes == before
