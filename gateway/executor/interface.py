"""`Executor`: everything the engine may call on what runs its steps, and `StepResult`, what
one step gives back. Implemented by ModelRunner (tp=1: one device, nothing to watch) and
TensorParallelExecutor (rank 0 of N, with worker processes); the engine programs against
this Protocol alone, so it never probes for attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway.models.arch import ModelArch
    from gateway.sampling.logprobs import TokenLogprob


@dataclass
class StepResult:
    token_ids: list[int | None]                    # aligned with the scheduler output; None = no sample
    logprobs: list[TokenLogprob | None] | None     # aligned likewise; None when no row asked
    errors: dict[int, str] = field(default_factory=dict)   # row → why its sample is void (fails that request)
    # Embedding rows (seq.pooling) → this step's part of their vector, on the first rank only.
    pooled: dict[int, PooledChunk] = field(default_factory=dict)


@dataclass
class PooledChunk:
    """One step's contribution to an embedding: the float32 sum of the final hidden states of
    positions [start, start + count) ("mean"), or the last position's alone ("last", count 1,
    only in the step that computes it)."""
    vector: object          # torch.Tensor [hidden_size], float32, on the CPU
    start: int
    count: int


@runtime_checkable
class Executor(Protocol):
    arch: ModelArch
    # Called (from a monitor thread) when the executor dies, so an idle engine loop wakes up.
    death_listener: Callable[[], None] | None

    @property
    def num_blocks(self) -> int: ...           # KV blocks per rank: the scheduler's capacity

    @property
    def worker_pids(self) -> list[int]: ...    # tensor-parallel worker processes; [] at tp=1

    def execute(self, scheduled) -> StepResult: ...   # one step for a ScheduledSequence list

    def check_health(self) -> None: ...        # raises ExecutorDeadError once the executor died

    def shutdown(self) -> None: ...            # idempotent; stops the workers
