"""KVCacheManager: which blocks each sequence holds (seq.block_table) and which of its
full blocks are registered in the prefix cache (seq.block_hashes), on top of a BlockPool.

A sequence's life, in order:
  get_computed_prefix(seq)   at admission: the longest chain of its full blocks already
                             in the pool, capped so that at least one token is computed;
  allocate_slots(seq, n, hit)  all or nothing: touch the hit blocks, count the prefix-cache
                             query, set num_computed_tokens / num_cached_tokens, then
                             allocate blocks until the table covers computed + n tokens;
  cache_computed_blocks(seq) after a step advanced num_computed_tokens: register every
                             newly full, computed block under its chained hash;
  free(seq)                  release its blocks, tail first, and forget its hashes.

Block hashes are chained: hash(block i) = hash((hash(block i-1) or ROOT, tokens of i)), so
equal hashes mean equal whole prefixes, not merely equal blocks. Python's hash of a tuple
of ints is deterministic across processes (no PYTHONHASHSEED salt), so the values are
stable. Pure CPU code: no torch imports."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from gateway.scheduler.block_pool import BlockPool
from gateway.scheduler.sequence import Sequence

# The parent of a sequence's first block; any fixed int works.
ROOT_BLOCK_HASH = 0x5EED_CAFE_F00D_BEEF


def hash_block(parent_hash: int | None, token_ids: SequenceOf[int]) -> int:
    parent = ROOT_BLOCK_HASH if parent_hash is None else parent_hash
    return hash((parent, tuple(token_ids)))


def block_hashes(token_ids: SequenceOf[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of every FULL block of token_ids; a trailing partial block has none."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, block_pool: BlockPool):
        self.pool = block_pool
        self.block_size = block_pool.block_size
        self.enable_prefix_caching = block_pool.enable_prefix_caching
        # Cumulative, in tokens; counted once per successful admission (see allocate_slots).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def get_computed_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """(block ids, number of tokens) of the longest cached chain of seq's full blocks.
        At most (num_tokens - 1) // block_size blocks, so one token is left to compute
        and the step that computes it samples the next token. Changes nothing."""
        assert seq.num_computed_tokens == 0, "prefix lookup is for sequences being admitted"
        if not self.enable_prefix_caching or seq.pooling is not None:
            return [], 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit_blocks: list[int] = []
        parent = None
        for index in range(max_blocks):
            start = index * self.block_size
            parent = hash_block(parent, seq.token_ids[start:start + self.block_size])
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            hit_blocks.append(block_id)
        return hit_blocks, len(hit_blocks) * self.block_size

    def num_blocks_to_allocate(self, seq: Sequence, num_new_tokens: int,
                               computed_blocks: SequenceOf[int] = ()) -> int:
        """Free-list blocks that allocate_slots would consume: new blocks plus the hit
        blocks that currently sit in the free list (touching takes them out of it)."""
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        num_held = len(seq.block_table) + len(computed_blocks)
        num_new_blocks = max(0, cdiv(num_computed + num_new_tokens, self.block_size) - num_held)
        num_revived = sum(1 for block_id in computed_blocks if self.pool.ref_count(block_id) == 0)
        return num_new_blocks + num_revived

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: SequenceOf[int] = ()) -> bool:
        """Give seq slots for num_new_tokens more tokens after its computed ones, first
        adopting computed_blocks (a prefix-cache hit from get_computed_prefix) when it is
        being admitted. Returns False, having changed nothing, when the pool is short."""
        admitting = not seq.block_table
        assert not admitting or seq.num_computed_tokens == 0, "a sequence without blocks has computed nothing"
        assert admitting or not computed_blocks, "a prefix hit is only adopted at admission"
        num_hit_tokens = len(computed_blocks) * self.block_size
        assert num_new_tokens >= 1
        assert seq.num_computed_tokens + num_hit_tokens + num_new_tokens <= seq.num_tokens, \
            "cannot schedule tokens the sequence does not have"
        if self.num_blocks_to_allocate(seq, num_new_tokens, computed_blocks) > self.pool.num_free_blocks:
            return False
        if admitting:
            self._adopt_prefix(seq, computed_blocks)
        num_needed = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        seq.block_table.extend(self.pool.allocate(max(0, num_needed - len(seq.block_table))))
        return True

    def _adopt_prefix(self, seq: Sequence, computed_blocks: SequenceOf[int]) -> None:
        # Touch before allocating new blocks: allocate must never evict a block we reuse.
        self.pool.touch(computed_blocks)
        seq.block_table.extend(computed_blocks)
        # The hit blocks are registered under exactly the hashes of seq's prefix.
        seq.block_hashes = [self.pool.block_hash(block_id) for block_id in computed_blocks]
        seq.num_computed_tokens = seq.num_cached_tokens = len(computed_blocks) * self.block_size
        if self.enable_prefix_caching:
            # Counted here, not at lookup, so a sequence that waits at the head of the
            # queue for several steps is counted once per admission, not once per step.
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register each block that is now full and computed, in order, once."""
        if not self.enable_prefix_caching:
            return
        num_full_computed = seq.num_computed_tokens // self.block_size
        for index in range(len(seq.block_hashes), num_full_computed):
            start = index * self.block_size
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block(parent, seq.token_ids[start:start + self.block_size])
            self.pool.cache_block(seq.block_table[index], block_hash)
            seq.block_hashes.append(block_hash)

    def free(self, seq: Sequence) -> None:
        # Reversed: the tail blocks reach the free list first and are evicted first,
        # while the prefix blocks, the likeliest to be shared, survive longest.
        self.pool.free(reversed(seq.block_table))
        seq.block_table.clear()
        seq.block_hashes.clear()
