"""Every dataclass that crosses the process boundary between the tensor-parallel driver
(rank 0, inside the engine process) and its worker processes. Plain data only.

Conversation, in order: spawn(WorkerSpec) → worker sends WorkerReady (weights loaded,
its KV block capacity) or WorkerFailed → driver sends InitKVCache(minimum over ranks) →
one StepMessage per engine step → Shutdown. A worker that hits an error mid-run sends
WorkerFailed and exits.

Steps carry deltas, not state: a sequence the workers have not seen (or that came back
after preemption) arrives once in full as NewSequence; afterwards only its SequenceDelta
(tokens sampled since, blocks allocated since); finished or preempted ones are named in
`freed`. `rows` is the step's schedule in the driver's order."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import Config
from gateway.executor.parallel import CommSpec
from gateway.executor.placement import Placement
from gateway.models.loader import ModelSource


@dataclass(frozen=True)
class WorkerSpec:
    config: Config
    source: ModelSource
    placement: Placement      # the driver's device and dtype: ranks never resolve their own
    rank: int
    comm: CommSpec
    parent_pid: int
    num_threads: int


@dataclass(frozen=True)
class WorkerReady:
    rank: int
    pid: int
    max_num_blocks: int       # what this rank's KV budget holds


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    error: str                # the worker's traceback


@dataclass(frozen=True)
class InitKVCache:
    num_blocks: int


@dataclass(slots=True)
class NewSequence:
    seq_id: int
    token_ids: list[int]
    block_table: list[int]


@dataclass(slots=True)
class SequenceDelta:
    seq_id: int
    new_token_ids: list[int]
    new_block_ids: list[int]


@dataclass(slots=True)
class ScheduledRow:
    seq_id: int
    num_new_tokens: int
    num_computed_tokens: int  # before this step


@dataclass(slots=True)
class StepMessage:
    rows: list[ScheduledRow]
    new: list[NewSequence] = field(default_factory=list)
    deltas: list[SequenceDelta] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Shutdown:
    pass
