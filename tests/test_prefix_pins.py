"""PrefixPins over a tiny BlockPool with exact block ids: pinned prefix blocks survive LRU
eviction, stay within the budget, and every reference comes back on unpin."""

import pytest

from gateway.scheduler.block_pool import BlockPool
from gateway.scheduler.kv_cache_manager import block_hashes
from gateway.scheduler.prefix_pins import PrefixPins

BLOCK = 4


def cached_prefix(pool: BlockPool, token_ids: list[int]) -> list[int]:
    """Compute token_ids as a finished sequence would: allocate, register, free."""
    hashes = block_hashes(token_ids, BLOCK)
    blocks = pool.allocate(len(hashes))
    for block_id, block_hash in zip(blocks, hashes):
        pool.cache_block(block_id, block_hash)
    pool.free(reversed(blocks))
    return blocks


def test_a_pinned_prefix_survives_eviction_of_every_free_block():
    pool = BlockPool(8, BLOCK)
    tokens = list(range(10))                  # two full blocks and a partial one
    blocks = cached_prefix(pool, tokens)
    pins = PrefixPins(pool, budget_blocks=8)
    assert pins.pin("s", tokens) == 2
    pool.allocate(pool.num_free_blocks)       # evicts everything that is free
    assert [pool.lookup(h) for h in block_hashes(tokens, BLOCK)] == blocks
    pool.check_invariants()


def test_without_a_pin_the_same_prefix_is_evicted():
    pool = BlockPool(8, BLOCK)
    tokens = list(range(10))
    cached_prefix(pool, tokens)
    pool.allocate(pool.num_free_blocks)
    assert [pool.lookup(h) for h in block_hashes(tokens, BLOCK)] == [None, None]


def test_pin_stops_at_the_first_uncached_block():
    pool = BlockPool(8, BLOCK)
    cached = cached_prefix(pool, list(range(8)))
    pins = PrefixPins(pool, budget_blocks=8)
    assert pins.pin("s", list(range(8)) + [99, 98, 97, 96]) == 2
    assert pins.blocks_of("s") == cached


def test_pins_stay_within_the_budget_across_keys():
    pool = BlockPool(8, BLOCK)
    a, b = list(range(12)), list(range(100, 112))
    cached_prefix(pool, a)
    cached_prefix(pool, b)
    pins = PrefixPins(pool, budget_blocks=4)
    assert pins.pin("a", a) == 3
    assert pins.pin("b", b) == 1              # only one pinned reference left in the budget
    assert pins.num_pinned_blocks == 4


def test_repinning_a_shorter_prefix_keeps_the_shared_blocks_and_frees_the_rest():
    pool = BlockPool(8, BLOCK)
    tokens = list(range(12))
    blocks = cached_prefix(pool, tokens)
    pins = PrefixPins(pool, budget_blocks=8)
    pins.pin("s", tokens)
    assert pins.pin("s", tokens[:8]) == 2     # a revert: the kept prefix is re-pinned
    assert [pool.ref_count(b) for b in blocks] == [1, 1, 0]
    assert pool.is_free(blocks[2]) and pool.lookup(block_hashes(tokens, BLOCK)[2]) == blocks[2]


def test_unpin_and_release_oldest_return_every_reference():
    pool = BlockPool(8, BLOCK)
    cached_prefix(pool, list(range(8)))
    cached_prefix(pool, list(range(50, 58)))
    pins = PrefixPins(pool, budget_blocks=8)
    pins.pin("old", list(range(8)))
    pins.pin("new", list(range(50, 58)))
    assert pool.num_free_blocks == 4
    assert pins.release_oldest() == "old"
    assert pins.unpin("new") == 2 and pins.unpin("unknown") == 0
    assert pool.num_free_blocks == 8 and pins.num_pinned_blocks == 0 and len(pins) == 0
    pool.check_invariants()


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError):
        PrefixPins(BlockPool(2, BLOCK), budget_blocks=-1)
