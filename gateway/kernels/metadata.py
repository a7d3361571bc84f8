"""AttentionMetadata: the flat-batch description every attention call receives explicitly.

Sequences are ordered decodes first: sequences [0, num_decodes) have exactly one query
token each, and those tokens are the first num_decodes tokens of the flat batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token; -1 = padding, skipped
    query_start_loc: torch.Tensor   # [S+1] int32: cumulative query lengths
    seq_lens: torch.Tensor          # [S] int32: context length after this step (cached + new)
    block_tables: torch.Tensor      # [S, max_blocks] int32, rows padded with 0
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    query_start_loc_cpu: list[int]  # host copies: the CPU path slices with them, no syncs
    seq_lens_cpu: list[int]
    # Split-K count for the Triton decode kernel; None → chosen per call from seq_lens_cpu.
    # CUDA graphs fix it per batch bucket, since a replay never sees the host lists.
    decode_splits: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
