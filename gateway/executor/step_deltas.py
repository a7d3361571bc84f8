"""The two halves of the per-step protocol between the driver and the tensor-parallel workers.

DeltaEncoder (driver, engine thread): remembers, per sequence it has sent, how many tokens
and blocks the workers hold; `encode(scheduled)` first names the sequences that finished or
were preempted since (freed), then, in schedule order, sends unseen sequences in full and
the others as increments, and records the new high-water marks.
SequenceMirror (worker): applies a StepMessage in the same order (freed → new → deltas) to
lightweight sequences and returns rows shaped like the scheduler's (.seq.token_ids,
.seq.block_table, .seq.num_computed_tokens, .num_new_tokens), which build_flat_batch takes
as they are, so every rank builds the same flat batch. Block tables only grow while a
sequence runs (preemption frees them and the sequence is resent), which makes increments
sufficient."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gateway.executor.messages import NewSequence, ScheduledRow, SequenceDelta, StepMessage


@dataclass(slots=True)
class _Sent:
    seq_id: int
    seq: object               # the scheduler's Sequence
    num_tokens: int
    num_blocks: int
    num_preemptions: int


class DeltaEncoder:
    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._ids = itertools.count()

    @property
    def num_tracked(self) -> int:
        return len(self._sent)

    def encode(self, scheduled) -> StepMessage:
        message = StepMessage(rows=[], freed=self._collect_freed())
        for entry in scheduled:
            seq = entry.seq
            sent = self._sent.get(seq.request_id)
            if sent is None:
                sent = _Sent(next(self._ids), seq, 0, 0, seq.num_preemptions)
                self._sent[seq.request_id] = sent
                message.new.append(NewSequence(sent.seq_id, list(seq.token_ids), list(seq.block_table)))
            elif seq.num_tokens > sent.num_tokens or len(seq.block_table) > sent.num_blocks:
                message.deltas.append(SequenceDelta(sent.seq_id, seq.token_ids[sent.num_tokens:],
                                                    seq.block_table[sent.num_blocks:]))
            sent.num_tokens, sent.num_blocks = seq.num_tokens, len(seq.block_table)
            message.rows.append(ScheduledRow(sent.seq_id, entry.num_new_tokens, seq.num_computed_tokens))
        return message

    def _collect_freed(self) -> list[int]:
        gone = [rid for rid, s in self._sent.items()
                if s.seq.is_finished or s.seq.num_preemptions != s.num_preemptions]
        return [self._sent.pop(rid).seq_id for rid in gone]


@dataclass(slots=True)
class MirrorSequence:
    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class MirrorRow:
    seq: MirrorSequence
    num_new_tokens: int


class SequenceMirror:
    def __init__(self) -> None:
        self.seqs: dict[int, MirrorSequence] = {}

    def apply(self, message: StepMessage) -> list[MirrorRow]:
        for seq_id in message.freed:
            del self.seqs[seq_id]
        for new in message.new:
            self.seqs[new.seq_id] = MirrorSequence(new.token_ids, new.block_table)
        for delta in message.deltas:
            seq = self.seqs[delta.seq_id]
            seq.token_ids.extend(delta.new_token_ids)
            seq.block_table.extend(delta.new_block_ids)
        rows = []
        for row in message.rows:
            seq = self.seqs[row.seq_id]
            seq.num_computed_tokens = row.num_computed_tokens
            assert row.num_computed_tokens + row.num_new_tokens <= seq.num_tokens, "mirror out of step"
            rows.append(MirrorRow(seq, row.num_new_tokens))
        return rows
