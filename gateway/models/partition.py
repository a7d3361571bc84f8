"""How a model's dimensions are split over tensor-parallel ranks, and its layers over
pipeline stages (split_layers). Pure functions, no torch.

Attention is split by whole GQA groups (a KV head and the query heads that read it), so
every rank runs ordinary grouped attention on its own heads:
  * world_size <= num_kv_heads: groups are dealt out as evenly as possible, first ranks
    take one more (9 q / 3 kv heads over 2 ranks: [6, 3] q heads, [2, 1] kv heads);
  * world_size > num_kv_heads: each rank holds one KV head, replicated on the ranks that
    share a group; the group's query heads are split between those ranks (9/3 over 4:
    q heads [2, 1, 3, 3], kv head [0, 0, 1, 2]).
Everything else (MLP intermediate, vocabulary) is split in contiguous, nearly equal runs.
A shape that cannot be split raises ValueError naming the dimension and the limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShard:
    """One rank's heads, as index ranges into the checkpoint's head order."""
    q_start: int          # first query head
    num_heads: int        # query heads on this rank
    kv_start: int         # first KV head
    num_kv_heads: int     # KV heads on this rank (replicas included)


def split_evenly(size: int, world_size: int, what: str = "dimension") -> list[tuple[int, int]]:
    """[(start, length)] per rank: contiguous runs whose lengths differ by at most one."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if size < world_size:
        raise ValueError(f"cannot split {what} of size {size} over {world_size} tensor-parallel ranks "
                         f"(each rank needs at least one); use --tp <= {size}")
    base, extra = divmod(size, world_size)
    runs, start = [], 0
    for rank in range(world_size):
        length = base + (1 if rank < extra else 0)
        runs.append((start, length))
        start += length
    return runs


def partition_attention(num_heads: int, num_kv_heads: int, world_size: int) -> list[AttentionShard]:
    """Split attention heads by whole GQA groups (see the module docstring)."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    if world_size > num_heads:
        raise ValueError(f"cannot shard {num_heads} attention heads over {world_size} tensor-parallel "
                         f"ranks: every rank needs at least one query head; use --tp <= {num_heads}")
    group = num_heads // num_kv_heads
    if world_size <= num_kv_heads:
        return [AttentionShard(kv_start * group, kv_len * group, kv_start, kv_len)
                for kv_start, kv_len in split_evenly(num_kv_heads, world_size, "KV heads")]
    shards = []
    for kv_head, (_, ranks) in enumerate(split_evenly(world_size, num_kv_heads, "ranks")):
        assert ranks <= group, "world_size <= num_heads keeps every group's ranks <= its heads"
        for q_offset, q_len in split_evenly(group, ranks, "query heads of a group"):
            shards.append(AttentionShard(kv_head * group + q_offset, q_len, kv_head, 1))
    return shards


@dataclass(frozen=True)
class LayerStage:
    """One pipeline stage's share of the model: layers [start, start + count); the first
    stage also holds the embedding, the last the final norm and the LM head."""
    start: int
    count: int
    is_first: bool
    is_last: bool

    @property
    def end(self) -> int:
        return self.start + self.count


def split_layers(num_layers: int, num_stages: int, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[(first layer, layer count)] per pipeline stage: contiguous; `counts` (--pp-layers)
    overrides the even split and must add up to the model's layers."""
    if counts is None:
        if num_layers < num_stages:
            raise ValueError(f"cannot split {num_layers} layers into {num_stages} pipeline stages "
                             f"(each stage needs at least one); use --pp <= {num_layers}")
        return split_evenly(num_layers, num_stages, "layers")
    if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"--pp-layers {','.join(map(str, counts))} must give {num_stages} positive counts "
                         f"adding up to the model's {num_layers} layers")
    starts = [sum(counts[:i]) for i in range(num_stages)]
    return list(zip(starts, counts))
