"""BlockPool: the fixed set of KV-cache blocks, their reference counts, the LRU free
list and the prefix-cache map from a full block's chained hash to the block holding it.

It owns block bookkeeping only; which sequence holds which block is the KVCacheManager's
business. Side effects, per call:
  allocate(n)  pop n blocks from the head of the free list (least recently freed first),
               drop any hash each one still carried (lazy eviction), ref count := 1;
  touch(ids)   a cache hit: take each block out of the free list if it sits there, ref += 1;
  free(ids)    ref -= 1, in the order given; a block reaching 0 goes to the tail of the
               free list and keeps its hash, so a later lookup can still hit it;
  cache_block  record hash → block for a full, computed block.
Freed blocks therefore stay reusable as cache hits until allocate hands them out again.
Pure CPU code: no torch imports."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """allocate() was asked for more blocks than the free list holds."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Keys only; OrderedDict gives O(1) removal from the middle (a cache hit on a
        # freed block) and O(1) pops from the head. Initially 0, 1, 2, ... so ids are predictable.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of_block: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}

    # ----------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence (ref count > 0)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash this block is registered under, or None."""
        return self._hash_of_block[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_block_ids(self) -> list[int]:
        """The free list, head (next handed out) first."""
        return list(self._free)

    def lookup(self, block_hash: int) -> int | None:
        if not self.enable_prefix_caching:
            return None
        return self._block_of_hash.get(block_hash)

    # ----------------------------------------------------------------- changes

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict_hash(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Release one reference to each block, in the order given. Callers freeing a
        sequence pass its table reversed, so its tail blocks are evicted before its prefix."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise AssertionError(f"double free of block {block_id} (ref count is 0)")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Register a full, computed block under its chained hash. When another block is
        already registered under the same hash (two sequences computed the same prefix in
        one step), the existing entry wins and this block stays unregistered. Returns
        whether this block is now the one registered under the hash."""
        if not self.enable_prefix_caching:
            return False
        if self._ref_counts[block_id] <= 0:
            raise AssertionError(f"caching block {block_id}, which no sequence holds")
        existing = self._block_of_hash.get(block_hash)
        if existing is not None:
            return existing == block_id
        if self._hash_of_block[block_id] is not None:
            raise AssertionError(f"block {block_id} is already registered under another hash")
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash
        return True

    def _evict_hash(self, block_id: int) -> None:
        block_hash = self._hash_of_block[block_id]
        if block_hash is not None:
            del self._block_of_hash[block_hash]
            self._hash_of_block[block_id] = None

    # --------------------------------------------------------------- checking

    def check_invariants(self) -> None:
        """Raise AssertionError when the bookkeeping disagrees with itself. For tests and
        debugging; O(num_blocks)."""
        refs = self._ref_counts
        assert all(r >= 0 for r in refs), "negative ref count"
        free_by_ref = {b for b in range(self.num_blocks) if refs[b] == 0}
        assert set(self._free) == free_by_ref, "free list differs from the ref-0 blocks"
        for block_hash, block_id in self._block_of_hash.items():
            assert self._hash_of_block[block_id] == block_hash, f"hash map disagrees at {block_id}"
        registered = sum(h is not None for h in self._hash_of_block)
        assert registered == len(self._block_of_hash), "a block carries a hash the map lacks"
