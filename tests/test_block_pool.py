"""BlockPool: exact block ids, LRU reuse, reference counts and lazy eviction of hashes."""

import pytest

from gateway.scheduler.block_pool import BlockPool, OutOfBlocksError


def make_pool(num_blocks=8, block_size=4, enable_prefix_caching=True) -> BlockPool:
    return BlockPool(num_blocks, block_size, enable_prefix_caching)


def test_a_fresh_pool_hands_out_blocks_in_id_order():
    pool = make_pool()
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free_blocks == 3
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_allocating_more_than_is_free_raises_and_changes_nothing():
    pool = make_pool()
    pool.allocate(6)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(3)
    assert pool.free_block_ids() == [6, 7]


def test_freed_blocks_are_reused_least_recently_freed_first():
    pool = make_pool()
    pool.allocate(4)                      # 0 1 2 3
    pool.free([1])
    pool.free([3])
    assert pool.free_block_ids() == [4, 5, 6, 7, 1, 3]
    assert pool.allocate(6) == [4, 5, 6, 7, 1, 3]


def test_free_releases_in_the_order_given():
    pool = make_pool(num_blocks=3)
    pool.allocate(3)
    pool.free([2, 1, 0])                  # a sequence's table, reversed
    assert pool.free_block_ids() == [2, 1, 0]


def test_a_block_returns_to_the_free_list_only_when_its_last_reference_goes():
    pool = make_pool()
    (block,) = pool.allocate(1)
    pool.touch([block])
    pool.free([block])
    assert pool.ref_count(block) == 1 and not pool.is_free(block)
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.is_free(block)


def test_freeing_a_free_block_is_a_double_free():
    pool = make_pool()
    pool.allocate(1)
    pool.free([0])
    with pytest.raises(AssertionError, match="double free of block 0"):
        pool.free([0])


def test_touching_a_free_block_takes_it_out_of_the_free_list():
    pool = make_pool()
    pool.allocate(2)
    pool.free([1])
    pool.touch([1])
    assert pool.ref_count(1) == 1
    assert pool.free_block_ids() == [2, 3, 4, 5, 6, 7]


def test_freed_blocks_keep_their_hash_until_they_are_handed_out_again():
    pool = make_pool(num_blocks=2)
    pool.allocate(1)
    pool.cache_block(0, block_hash=1234)
    pool.free([0])
    assert pool.lookup(1234) == 0 and pool.block_hash(0) == 1234
    assert pool.allocate(1) == [1]         # block 0 is behind block 1 in the free list
    assert pool.lookup(1234) == 0
    assert pool.allocate(1) == [0]         # now it is reused: the hash goes
    assert pool.lookup(1234) is None and pool.block_hash(0) is None
    assert pool.num_cached_blocks == 0


def test_a_hash_keeps_the_block_registered_first():
    pool = make_pool()
    pool.allocate(2)
    assert pool.cache_block(0, block_hash=77) is True
    assert pool.cache_block(1, block_hash=77) is False
    assert pool.lookup(77) == 0 and pool.block_hash(1) is None


def test_caching_a_block_nobody_holds_is_an_error():
    pool = make_pool()
    with pytest.raises(AssertionError):
        pool.cache_block(0, block_hash=5)


def test_with_prefix_caching_off_nothing_is_registered_or_found():
    pool = make_pool(enable_prefix_caching=False)
    pool.allocate(1)
    assert pool.cache_block(0, block_hash=5) is False
    assert pool.lookup(5) is None


def test_usage_is_the_fraction_of_blocks_with_references():
    pool = make_pool()
    assert pool.usage == 0.0
    pool.allocate(2)
    assert pool.usage == 0.25
    pool.free([0, 1])
    assert pool.usage == 0.0
    pool.check_invariants()


def test_a_pool_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0, 4)
