"""KVCacheManager: chained block hashes, prefix hits with exact block ids, all-or-nothing
slot allocation, registration of computed blocks and tail-first freeing."""

from gateway.scheduler.block_pool import BlockPool
from gateway.scheduler.kv_cache_manager import KVCacheManager, block_hashes, hash_block
from gateway.scheduler.sequence import Sequence

BLOCK = 4


def make_manager(num_blocks=8, enable_prefix_caching=True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, BLOCK, enable_prefix_caching))


def compute_all(manager: KVCacheManager, seq: Sequence) -> None:
    """Admit seq without a prefix hit and pretend one step computed all its tokens."""
    assert manager.allocate_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)


# ------------------------------------------------------------------ hashes

def test_only_full_blocks_are_hashed():
    assert len(block_hashes(list(range(10)), BLOCK)) == 2
    assert block_hashes([1, 2, 3], BLOCK) == []


def test_block_hashes_are_chained_through_the_parent():
    first, second = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert first == hash_block(None, [1, 2, 3, 4])
    assert second == hash_block(first, [5, 6, 7, 8])
    # The same block after a different prefix hashes differently.
    assert block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BLOCK)[1] != second


def test_block_hashes_continue_a_chain_from_a_parent():
    first, second = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert block_hashes([5, 6, 7, 8], BLOCK, parent=first) == [second]


# ------------------------------------------------------------------ slots

def test_slots_cover_the_computed_and_new_tokens():
    manager = make_manager()
    seq = Sequence("a", list(range(10)))
    assert manager.allocate_slots(seq, 5)
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 5
    assert manager.allocate_slots(seq, 5)
    assert seq.block_table == [0, 1, 2]
    assert seq.num_computed_tokens == 5    # progress is the scheduler's update, not ours


def test_a_second_sequence_sharing_two_full_blocks_hits_exactly_those_blocks():
    manager = make_manager()
    first = Sequence("a", list(range(10)))
    compute_all(manager, first)
    assert first.block_table == [0, 1, 2] and len(first.block_hashes) == 2

    second = Sequence("b", list(range(8)) + [100, 101, 102])
    hit_blocks, hit_tokens = manager.get_computed_prefix(second)
    assert (hit_blocks, hit_tokens) == ([0, 1], 8)
    assert manager.allocate_slots(second, 3, hit_blocks)
    assert second.block_table == [0, 1, 3]
    assert [manager.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert second.block_hashes == first.block_hashes
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10 + 11, 8)


def test_the_hit_leaves_at_least_one_token_to_compute():
    manager = make_manager()
    compute_all(manager, Sequence("a", list(range(8))))
    exactly_two_blocks = Sequence("b", list(range(8)))
    assert manager.get_computed_prefix(exactly_two_blocks) == ([0], 4)


def test_a_hit_stops_at_the_first_block_that_differs():
    manager = make_manager()
    compute_all(manager, Sequence("a", list(range(12))))
    diverging = Sequence("b", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])
    assert manager.get_computed_prefix(diverging) == ([0], 4)


def test_a_failed_allocation_counts_hit_blocks_it_would_take_from_the_free_list():
    manager = make_manager()
    first = Sequence("a", list(range(8)))
    compute_all(manager, first)                              # blocks 0 1, registered
    manager.free(first)                                      # free list: 2..7, 1, 0
    manager.allocate_slots(Sequence("filler", [7] * 20), 20)  # takes 2 3 4 5 6
    assert manager.pool.free_block_ids() == [7, 1, 0]

    second = Sequence("b", list(range(8)) + [50, 51, 52, 53, 54])  # 4 blocks: 2 hit + 2 new
    hit_blocks, _ = manager.get_computed_prefix(second)
    assert hit_blocks == [0, 1]
    assert not manager.allocate_slots(second, 5, hit_blocks)  # 2 new + 2 revived > 3 free
    assert second.block_table == [] and second.num_computed_tokens == 0
    assert manager.pool.free_block_ids() == [7, 1, 0]
    assert (manager.pool.ref_count(0), manager.pool.ref_count(1)) == (0, 0)
    assert manager.prefix_cache_queries == 8 + 20            # the failed admission is not counted


def test_a_hit_on_blocks_another_sequence_holds_takes_nothing_from_the_free_list():
    manager = make_manager(num_blocks=4)
    compute_all(manager, Sequence("a", list(range(8))))     # blocks 0 1 held
    manager.allocate_slots(Sequence("filler", [9]), 1)       # block 2
    second = Sequence("b", list(range(8)) + [42])            # 2 hit + 1 new, 1 free
    hit_blocks, _ = manager.get_computed_prefix(second)
    assert manager.allocate_slots(second, 1, hit_blocks)
    assert second.block_table == [0, 1, 3]


def test_computed_blocks_are_registered_once_as_they_fill():
    manager = make_manager()
    seq = Sequence("a", list(range(10)))
    manager.allocate_slots(seq, 5)
    seq.num_computed_tokens = 5
    manager.cache_computed_blocks(seq)
    assert seq.block_hashes == block_hashes(list(range(4)), BLOCK)
    manager.allocate_slots(seq, 5)
    seq.num_computed_tokens = 10
    manager.cache_computed_blocks(seq)
    manager.cache_computed_blocks(seq)
    assert seq.block_hashes == block_hashes(list(range(10)), BLOCK)
    assert manager.pool.num_cached_blocks == 2
    assert [manager.pool.lookup(h) for h in seq.block_hashes] == [0, 1]


def test_freeing_a_sequence_releases_its_tail_first_and_forgets_its_hashes():
    manager = make_manager(num_blocks=3)
    seq = Sequence("a", list(range(10)))
    compute_all(manager, seq)
    manager.free(seq)
    assert manager.pool.free_block_ids() == [2, 1, 0]
    assert seq.block_table == [] and seq.block_hashes == []
    assert manager.pool.lookup(block_hashes(list(range(4)), BLOCK)[0]) == 0  # lazily kept


def test_with_prefix_caching_off_nothing_hits_and_nothing_is_counted():
    manager = make_manager(enable_prefix_caching=False)
    compute_all(manager, Sequence("a", list(range(10))))
    second = Sequence("b", list(range(10)))
    assert manager.get_computed_prefix(second) == ([], 0)
    assert manager.pool.num_cached_blocks == 0
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)
