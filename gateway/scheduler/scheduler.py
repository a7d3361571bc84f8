"""Scheduler: decides, each engine step, which sequences compute how many tokens, under a
token budget (max_num_batched_tokens), a sequence cap (max_num_seqs) and the KV block pool.
A step that runs decodes gives prefill chunks at most max_prefill_tokens_with_decodes of its
budget: one long prompt then costs every running stream a few short steps, not one step of
seconds (inter-token latency); a step without decodes prefills with the whole budget. A
decode is the last token of a sequence that was already running (ScheduledSequence.is_decode);
everything admitted in a step is prefill, even a one-token prompt.

It owns the waiting queue, the running list (in admission order) and the KVCacheManager.
One step, in order:
  schedule()  1. running sequences, oldest first, each gets min(tokens left, budget):
                 1 for a decode, a chunk for an unfinished prefill. When the pool is
                 short, the newest running sequence is preempted by recompute (blocks
                 freed, progress reset, pushed to the FRONT of the waiting queue) and the
                 allocation retried; a sequence that is itself the newest preempts itself
                 and scheduling of running sequences stops;
              2. only if nothing was preempted: waiting sequences from the front, each
                 adopting its prefix-cache hit and getting a (possibly chunked) prefill,
                 until the budget, the sequence cap or the pool runs out. While anything
                 runs, a sequence is admitted only if the pool left after its chunk still
                 holds the rest of its prompt plus the next admission_headroom_tokens
                 tokens of it and of every running sequence (each no further than its own
                 end, prompt + max_tokens). Without it, a long prompt's first chunk fit,
                 its next did not, it preempted itself and was readmitted into the room
                 it had just freed, every other step (tests/test_kv_pressure.py);
              The output lists one-token rows (decodes) first, then the rest, each group
              in scheduling order, as the flat batch expects;
  (the model runs the batch; ScheduledSequence.samples says which rows sample a token)
  update()    advance num_computed_tokens, register newly full blocks in the prefix
              cache, append sampled tokens; an embedding sequence (seq.pooling) that
              computed its last prompt token is finished here, its blocks freed at once;
  (the engine checks stop conditions and calls finish() for the sequences that stop)
abort() and finish() free a sequence's blocks at once.

Because admission only happens with budget left over, at most one running sequence has
an unfinished prefill and it is the newest; with max_num_batched_tokens >= max_num_seqs
every running sequence is scheduled every step, so none starves.
Pure CPU code: no torch imports."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from gateway.scheduler.block_pool import BlockPool
from gateway.scheduler.kv_cache_manager import KVCacheManager, cdiv
from gateway.scheduler.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    # A running sequence computing its one remaining token: the stream the prefill cap
    # protects. Rows admitted from the waiting queue are prefills, however short.
    is_decode: bool = False
    # Fixed at scheduling time, so it stays true after update() advances the sequence:
    # this step computes the sequence's last known token and therefore samples the next.
    samples: bool = field(init=False)
    # Position of the first new token (num_computed_tokens before this step).
    start_position: int = field(init=False)

    def __post_init__(self) -> None:
        self.start_position = self.seq.num_computed_tokens
        self.samples = self.start_position + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0           # in this step
    num_recomputed_tokens: int = 0     # tokens scheduled again that a preemption had dropped
    prefix_cache_queries: int = 0      # tokens looked up in this step
    prefix_cache_hits: int = 0         # tokens found in this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_prefill_tokens_with_decodes: int | None = None,
                 admission_headroom_tokens: int | None = None):
        self._check_limits(max_num_seqs, max_num_batched_tokens, max_model_len, num_blocks, block_size)
        self.max_num_seqs = max_num_seqs
        # Two blocks of growth per sequence by default: enough that what is admitted is not
        # the next victim, little enough that a pool under pressure still runs full
        # (simulated on the workloads: 16 or 64 tokens did worse on one side or the other).
        self.admission_headroom_tokens = (2 * block_size if admission_headroom_tokens is None
                                          else admission_headroom_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_with_decodes = max_prefill_tokens_with_decodes or max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.kv_cache = KVCacheManager(self.block_pool)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []            # admission order: newest last
        self._unfinished: dict[str, Sequence] = {}   # request_id → sequence, for abort()

    @staticmethod
    def _check_limits(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                      num_blocks: int, block_size: int) -> None:
        if min(max_num_seqs, max_num_batched_tokens, max_model_len, num_blocks, block_size) < 1:
            raise ValueError("scheduler limits must all be >= 1")
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise the oldest running sequences eat the budget and the newest starve.
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs})")
        if max_model_len > num_blocks * block_size:
            # Otherwise a sequence could grow past the pool and preempt itself forever.
            raise ValueError(f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks "
                             f"of {block_size}) but max_model_len is {max_model_len}: lower max_model_len "
                             f"or give the KV cache more blocks")

    # ----------------------------------------------------------------- queries

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.block_pool.block_size

    # --------------------------------------------------- requests in and out

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {seq.num_tokens} tokens, more than max_model_len "
                             f"({self.max_model_len})")
        if seq.request_id in self._unfinished:
            raise ValueError(f"request id {seq.request_id!r} is already in the scheduler")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} is not a fresh waiting sequence")
        self._unfinished[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks now. Unknown or already
        finished ids return None (a late abort is not an error)."""
        seq = self._unfinished.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Called by the engine when a stop condition hits. Idempotent."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.grammar = None   # the matcher's memory goes now, whatever ended the request
        del self._unfinished[seq.request_id]

    # ------------------------------------------------------------------ a step

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        queries_before = self.kv_cache.prefix_cache_queries
        hits_before = self.kv_cache.prefix_cache_hits
        budget = self._schedule_running(output, self.max_num_batched_tokens)
        if not output.preempted:
            budget = self._admit_waiting(output, budget)
        # Rows with one new token first, keeping order otherwise: AttentionMetadata
        # expects the decodes to lead the flat batch.
        output.scheduled.sort(key=lambda row: row.num_new_tokens > 1)
        output.num_batched_tokens = self.max_num_batched_tokens - budget
        output.num_preemptions = len(output.preempted)
        output.num_recomputed_tokens = sum(
            max(0, min(row.start_position + row.num_new_tokens, row.seq.recompute_until) - row.start_position)
            for row in output.scheduled)
        output.prefix_cache_queries = self.kv_cache.prefix_cache_queries - queries_before
        output.prefix_cache_hits = self.kv_cache.prefix_cache_hits - hits_before
        assert sum(s.num_new_tokens for s in output.scheduled) == output.num_batched_tokens
        assert output.num_batched_tokens <= self.max_num_batched_tokens, "token budget exceeded"
        assert len(self.running) <= self.max_num_seqs, "max_num_seqs exceeded"
        return output

    def _prefill_budget(self, output: SchedulerOutput, budget: int) -> int:
        """Tokens a prefill chunk may take now: the budget, capped once decodes share the step."""
        if not any(row.is_decode for row in output.scheduled):
            return budget
        prefill = sum(row.num_new_tokens for row in output.scheduled if not row.is_decode)
        return min(budget, self.max_prefill_tokens_with_decodes - prefill)

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            remaining = seq.num_tokens - seq.num_computed_tokens
            assert remaining >= 1, f"running sequence {seq.request_id!r} has nothing to compute"
            num_new = 1 if remaining == 1 else min(remaining, self._prefill_budget(output, budget))
            if num_new < 1:
                break  # only the newest can be mid-prefill, so nothing after it is left
            if not self._allocate_or_preempt(seq, num_new, output):
                break  # seq preempted itself: it was the newest, nothing after it is left
            output.scheduled.append(ScheduledSequence(seq, num_new, is_decode=remaining == 1))
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, output: SchedulerOutput) -> bool:
        """Allocate slots for seq, preempting the newest running sequences until they fit.
        False when seq itself had to go."""
        while not self.kv_cache.allocate_slots(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute, not swap: the KV is dropped and rebuilt (often from the prefix
        # cache, since freed blocks keep their hashes) when the sequence is readmitted.
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.recompute_until = max(seq.recompute_until, seq.num_computed_tokens)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> int:
        reserve = sum(self._growth_blocks(seq, len(seq.block_table)) for seq in self.running)
        while self.waiting and len(self.running) < self.max_num_seqs:
            limit = self._prefill_budget(output, budget)
            if limit < 1:
                break
            seq = self.waiting[0]
            computed_blocks, num_cached = [], 0
            if seq.num_computed_tokens == 0:
                computed_blocks, num_cached = self.kv_cache.get_computed_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens - num_cached, limit)
            growth = self._growth_blocks(seq, cdiv(num_cached + num_new, self.block_size))
            if self.running and not self._leaves_headroom(seq, num_new, computed_blocks, reserve + growth):
                break  # the pool is under pressure: keep the running ones running
            if not self.kv_cache.allocate_slots(seq, num_new, computed_blocks):
                break  # first come, first served: no overtaking the head of the queue
            reserve += growth
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            output.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget

    def _growth_blocks(self, seq: Sequence, num_held_blocks: int) -> int:
        """Blocks seq needs beyond num_held_blocks for the rest of its prompt and its next
        admission_headroom_tokens tokens, no further than its own end (prompt + max_tokens)."""
        end = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        target = max(seq.num_tokens, min(seq.num_tokens + self.admission_headroom_tokens, end))
        return max(0, cdiv(target, self.block_size) - num_held_blocks)

    def _leaves_headroom(self, seq: Sequence, num_new: int, computed_blocks: list[int], reserve: int) -> bool:
        """Whether admitting seq's chunk still leaves `reserve` blocks free."""
        needed = self.kv_cache.num_blocks_to_allocate(seq, num_new, computed_blocks)
        return self.num_free_blocks - needed >= reserve

    def update(self, output: SchedulerOutput, sampled_token_ids: list[int | None]) -> None:
        """Record what the model computed in the step that `output` described.
        sampled_token_ids is aligned with output.scheduled: a token for each row whose
        `samples` is true, None for the others (prefill chunks that did not catch up).
        Stop conditions are the engine's: it calls finish() afterwards."""
        if len(sampled_token_ids) != len(output.scheduled):
            raise ValueError(f"{len(sampled_token_ids)} sampled tokens for "
                             f"{len(output.scheduled)} scheduled sequences")
        for scheduled, token_id in zip(output.scheduled, sampled_token_ids):
            seq = scheduled.seq
            if seq.is_finished:
                continue  # aborted while the step ran; its blocks are already free
            assert (token_id is not None) == (scheduled.samples and seq.pooling is None), \
                f"{seq.request_id!r}: a token is sampled exactly when a generation step catches up"
            seq.num_computed_tokens += scheduled.num_new_tokens
            self.kv_cache.cache_computed_blocks(seq)
            if token_id is not None:
                seq.append_token(token_id)
            elif scheduled.samples:   # an embedding's prompt is done: it is never decoded
                self.finish(seq, "stop")
