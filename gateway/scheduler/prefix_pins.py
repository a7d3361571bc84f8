"""PrefixPins: references held on prefix-cache blocks on behalf of long-lived owners (chat
sessions), so that LRU eviction cannot reclaim a conversation's KV between its turns.

It owns, per key, the block ids it pinned (one extra reference each on the BlockPool) and a
budget on the total number of pinned references. Side effects, per call:
  pin(key, token_ids)  look up the chained hashes of token_ids' full blocks in the pool and
                       stop at the first miss (only a cached prefix can be pinned), keep as
                       many leading blocks as the budget allows, take a reference on each
                       (touch: out of the free list), THEN release the key's previous pin;
                       taking before releasing keeps blocks the two pins share off the
                       free list;
  unpin(key)           release the key's references (tail first, as a finished sequence does);
  release_oldest()     unpin the least recently pinned key: the scheduler's pressure valve.
With no key pinned, every reference it took has been returned, so "all blocks free when
idle" holds again. Pure CPU code: no torch imports; called from the engine thread only."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from gateway.scheduler.block_pool import BlockPool
from gateway.scheduler.kv_cache_manager import block_hashes


class PrefixPins:
    def __init__(self, pool: BlockPool, budget_blocks: int):
        if budget_blocks < 0:
            raise ValueError(f"the pinned-block budget must be >= 0, got {budget_blocks}")
        self.pool = pool
        self.budget_blocks = budget_blocks
        self._pinned: OrderedDict[Hashable, list[int]] = OrderedDict()   # least recent first
        self._num_pinned = 0

    @property
    def num_pinned_blocks(self) -> int:
        """Pinned references (a block pinned by two keys counts twice)."""
        return self._num_pinned

    def __len__(self) -> int:
        return len(self._pinned)

    def blocks_of(self, key: Hashable) -> list[int]:
        return list(self._pinned.get(key, ()))

    def pin(self, key: Hashable, token_ids: Sequence[int]) -> int:
        """Pin the cached full blocks of token_ids' prefix under key (replacing its previous
        pin); returns how many blocks are pinned now."""
        previous = self._pinned.pop(key, [])
        room = self.budget_blocks - (self._num_pinned - len(previous))
        blocks = self._cached_prefix(token_ids, room)
        self.pool.touch(blocks)
        self._release(previous)
        if blocks:
            self._pinned[key] = blocks
            self._num_pinned += len(blocks)
        return len(blocks)

    def unpin(self, key: Hashable) -> int:
        """Release key's pin; returns the number of blocks released (0 for unknown keys)."""
        blocks = self._pinned.pop(key, [])
        self._release(blocks)
        return len(blocks)

    def release_oldest(self) -> Hashable | None:
        if not self._pinned:
            return None
        key = next(iter(self._pinned))
        self.unpin(key)
        return key

    def clear(self) -> None:
        while self._pinned:
            self.release_oldest()

    def _cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> list[int]:
        if max_blocks <= 0:
            return []
        blocks = []
        for block_hash in block_hashes(token_ids, self.pool.block_size)[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def _release(self, blocks: list[int]) -> None:
        self.pool.free(reversed(blocks))
        self._num_pinned -= len(blocks)
