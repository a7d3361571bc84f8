"""Sequence: one request's token stream and its progress through the engine.

Progress is one counter: `num_computed_tokens` catches up to `num_tokens`. A step that
brings it level with `num_tokens` samples one new token. Prefill, chunked prefill,
prefix-cache hits and resumption after preemption all fall out of that counter.
Pure CPU code: no torch imports."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from gateway.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = -1             # set from token_ids when left at -1
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block, in order
    num_cached_tokens: int = 0              # prefix-cache hit at the latest admission
    num_preemptions: int = 0
    # Tokens computed before the latest preemption: computing positions below this again is
    # recompute (what SchedulerOutput.num_recomputed_tokens counts).
    recompute_until: int = 0
    finish_reason: str | None = None        # stop | length | abort | error
    first_scheduled_time: float | None = None
    # sampling.grammar.GrammarState when the request is constrained; dropped when it finishes.
    # Preemption by recompute keeps the output tokens, so the state stays valid across it.
    grammar: object | None = None
    # "last" | "mean" for an embedding request: prefill only, never decoded (Scheduler.update
    # finishes it in the step that computes its last prompt token) and never served from the
    # prefix cache (every position's hidden state is computed, so its vector does not depend
    # on what happened to be cached).
    pooling: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens == 0:
            raise ValueError("a sequence needs at least one prompt token")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
