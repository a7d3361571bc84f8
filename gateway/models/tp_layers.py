"""Tensor-parallel building blocks: one rank's slice of a model's linears and embedding.

ColumnParallelLinear keeps a run of output rows (merged q|k|v and gate|up: one run per
checkpoint shard); RowParallelLinear keeps a run of input columns and all-reduces its
output (once per call; the bias, if any, is added after the sum); VocabParallelEmbedding
keeps a run of vocabulary rows, zeroes lookups outside it and all-reduces. Each narrows
the checkpoint tensor to its slice before copying (a lazy CheckpointTensor or GGUFTensor
then reads only those bytes), so no rank materialises the whole model. A GGUF row-parallel
slice that does not fall on whole quantization blocks is dequantized (gguf_weights.py logs it).

`shard_plan(arch, rank, world_size)` decides the slices (gateway.models.partition);
the `*_linear` / `vocab_embedding` builders return the plain single-device modules when
`parallel` is None, so tensor_parallel_size 1 builds exactly the unsharded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from gateway.models.layers import Embedding, Linear
from gateway.models.loader import materialize
from gateway.models.partition import AttentionShard, partition_attention, split_evenly

if TYPE_CHECKING:
    from gateway.models.arch import ModelArch


class Communicator(Protocol):
    """The collectives a shard calls, declared here beside their callers; the executor
    implements them (executor/parallel.py: shared memory, gloo, NCCL)."""
    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...        # sums in place over ranks

    def gather(self, t: torch.Tensor) -> torch.Tensor | None: ...     # last dim, on rank 0 only

    def close(self) -> None: ...


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    comm: Communicator


@dataclass(frozen=True)
class ShardPlan:
    attention: AttentionShard
    mlp: tuple[int, int]      # (start, length) of the intermediate dimension
    vocab: tuple[int, int]    # (start, length) of the vocabulary


def shard_plan(arch: "ModelArch", rank: int = 0, world_size: int = 1) -> ShardPlan:
    """This rank's slices; ValueError (naming the dimension) when the model cannot be split."""
    return ShardPlan(partition_attention(arch.num_heads, arch.num_kv_heads, world_size)[rank],
                     split_evenly(arch.intermediate_size, world_size, "intermediate_size")[rank],
                     split_evenly(arch.vocab_size, world_size, "vocab_size")[rank])


class ColumnParallelLinear(Linear):
    """Output rows [start, start + length) of each checkpoint shard, concatenated in order."""

    def __init__(self, in_features: int, slices: dict[str | None, tuple[int, int]], bias: bool = False):
        sizes = {name: length for name, (_, length) in slices.items()}
        named = None not in slices
        super().__init__(in_features, sum(sizes.values()), bias=bias, shard_sizes=sizes if named else None)
        self.checkpoint_slices = slices

    def load_shard(self, param_name: str, shard: str | None, tensor) -> None:
        start, length = self.checkpoint_slices[shard]
        super().load_shard(param_name, shard, tensor.narrow(0, start, length))


class RowParallelLinear(Linear):
    """Input columns [start, start + length); the partial products are summed over ranks."""

    def __init__(self, in_slice: tuple[int, int], out_features: int, comm: "Communicator", bias: bool = False):
        super().__init__(in_slice[1], out_features, bias=False)
        self.in_slice, self.comm = in_slice, comm
        self.reduced_bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_shard(self, param_name: str, shard: str | None, tensor) -> None:
        if param_name == "bias":
            self.reduced_bias.data.copy_(materialize(tensor))
            return
        super().load_shard(param_name, shard, tensor.narrow(1, *self.in_slice))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_reduce(super().forward(x))
        return out if self.reduced_bias is None else out + self.reduced_bias


class VocabParallelEmbedding(Embedding):
    def __init__(self, vocab_slice: tuple[int, int], hidden_size: int, comm: "Communicator"):
        super().__init__(vocab_slice[1], hidden_size)
        self.start, self.length = vocab_slice
        self.comm = comm

    def load_shard(self, param_name: str, shard: str | None, tensor) -> None:
        super().load_shard(param_name, shard, tensor.narrow(0, self.start, self.length))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.length)
        out = self.lookup(local.clamp(0, self.length - 1))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(out)


# ---- builders: plain modules when parallel is None --------------------------------------------
def column_linear(in_features: int, slices: dict[str | None, tuple[int, int]], bias: bool,
                  parallel: ParallelContext | None) -> Linear:
    if parallel is None:
        sizes = {name: length for name, (_, length) in slices.items()}
        named = None not in slices
        return Linear(in_features, sum(sizes.values()), bias=bias, shard_sizes=sizes if named else None)
    return ColumnParallelLinear(in_features, slices, bias)


def row_linear(in_slice: tuple[int, int], out_features: int, bias: bool,
               parallel: ParallelContext | None) -> Linear:
    if parallel is None:
        return Linear(in_slice[1], out_features, bias=bias)
    return RowParallelLinear(in_slice, out_features, parallel.comm, bias)


def vocab_embedding(vocab_slice: tuple[int, int], hidden_size: int, parallel: ParallelContext | None) -> nn.Module:
    if parallel is None:
        return Embedding(vocab_slice[1], hidden_size)
    return VocabParallelEmbedding(vocab_slice, hidden_size, parallel.comm)
