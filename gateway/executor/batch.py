"""Turn one scheduler step into the flat batch a forward pass consumes: token ids,
positions, slot mapping, block tables and the attention metadata.

Rows stay in the order given: the scheduler already puts the one-token rows (decodes)
first, which AttentionMetadata.num_decodes relies on; a caller that did not is refused
(ValueError) rather than sorted here a second time. Built with numpy on the host, then one
copy per tensor to the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gateway.kernels.metadata import AttentionMetadata


@dataclass
class FlatBatch:
    input_ids: torch.Tensor          # [T]
    positions: torch.Tensor          # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor     # [N] token index whose logits are sampled
    sample_rows: list[int]           # rows (= scheduler-output indices) of the N sampled sequences


def build_flat_batch(scheduled, block_size: int, device: torch.device) -> FlatBatch:
    """`scheduled`: a list of objects with .seq and .num_new_tokens (ScheduledSequence),
    one-token rows first."""
    num_seqs = len(scheduled)
    query_lens = np.fromiter((entry.num_new_tokens for entry in scheduled), np.int64, num_seqs)
    num_decodes = int(np.cumprod(query_lens == 1).sum())   # the leading run of one-token rows
    if (query_lens[num_decodes:] == 1).any():
        raise ValueError("build_flat_batch: one-token rows must lead the step (the scheduler's order)")
    starts = np.fromiter((entry.seq.num_computed_tokens for entry in scheduled), np.int64, num_seqs)
    seq_lens = starts + query_lens
    query_start = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(query_lens, out=query_start[1:])
    total = int(query_start[-1])
    max_blocks = int(-(-seq_lens.max() // block_size))
    block_tables = np.zeros((num_seqs, max_blocks), np.int32)
    input_ids = np.empty(total, np.int64)
    sample_rows, logits_indices = [], []
    for row, entry in enumerate(scheduled):   # the one Python loop per step over sequences
        seq = entry.seq
        table = seq.block_table[:max_blocks]
        block_tables[row, :len(table)] = table
        lo, hi = int(starts[row]), int(seq_lens[row])
        input_ids[query_start[row]:query_start[row + 1]] = seq.token_ids[lo:hi]
        if hi == seq.num_tokens:
            sample_rows.append(row)
            logits_indices.append(int(query_start[row + 1]) - 1)
    # positions and slots, vectorized: token j of row r sits at starts[r] + (j - query_start[r])
    row_of_token = np.repeat(np.arange(num_seqs), query_lens)
    positions = starts[row_of_token] + (np.arange(total) - query_start[row_of_token])
    block_ids = block_tables[row_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_ids * block_size + positions % block_size
    as_tensor = lambda a, dtype: torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)
    meta = AttentionMetadata(
        slot_mapping=as_tensor(slot_mapping, torch.int64),
        query_start_loc=as_tensor(query_start, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(block_tables, torch.int32),
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
        num_decodes=num_decodes, query_start_loc_cpu=query_start.tolist(),
        seq_lens_cpu=seq_lens.tolist())
    return FlatBatch(input_ids=as_tensor(input_ids, torch.int64), positions=as_tensor(positions, torch.int64),
                     meta=meta, logits_indices=torch.tensor(logits_indices, device=device),
                     sample_rows=sample_rows)
