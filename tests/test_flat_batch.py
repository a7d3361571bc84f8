"""build_flat_batch (gateway/executor/batch.py) keeps the scheduler's row order: one-token
rows first, which the attention metadata's num_decodes counts; a step in another order is
refused instead of being sorted a second time. Rows, sampled rows and slots line up with
the scheduler's output index for index."""

from __future__ import annotations

import pytest
import torch

from gateway.executor.batch import build_flat_batch
from gateway.sampling.params import SamplingParams
from gateway.scheduler.scheduler import ScheduledSequence
from gateway.scheduler.sequence import Sequence

BS = 4


def row(name: str, length: int, new: int, first_block: int) -> ScheduledSequence:
    """A sequence of `length` tokens (ids name-coded) with `new` of them scheduled now."""
    base = 100 * (ord(name) - ord("a") + 1)
    blocks = list(range(first_block, first_block + -(-length // BS)))
    seq = Sequence(name, [base + t for t in range(length)], SamplingParams(temperature=0),
                   num_computed_tokens=length - new, block_table=blocks)
    return ScheduledSequence(seq, new)


def test_rows_stay_in_the_given_order():
    # two decodes, a finishing prefill chunk, an unfinished one (its last token is not scheduled)
    step = [row("a", 6, 1, 0), row("b", 3, 1, 2), row("c", 5, 5, 3), row("d", 9, 3, 5)]
    step[3].seq.num_computed_tokens = 4   # d: tokens 4..6 now, 7..8 later
    batch = build_flat_batch(step, BS, torch.device("cpu"))
    assert batch.meta.num_decodes == 2
    assert batch.meta.query_start_loc_cpu == [0, 1, 2, 7, 10]
    assert batch.input_ids.tolist() == [105, 202, 300, 301, 302, 303, 304, 404, 405, 406]
    assert batch.positions.tolist() == [5, 2, 0, 1, 2, 3, 4, 4, 5, 6]
    assert batch.sample_rows == [0, 1, 2]             # d has not caught up: no sample
    assert batch.logits_indices.tolist() == [0, 1, 6]
    # a's position 5 sits in its second block (1), offset 1; d's 4..6 in block 6
    assert batch.meta.slot_mapping.tolist()[:2] == [1 * BS + 1, 2 * BS + 2]
    assert batch.meta.slot_mapping.tolist()[7:] == [6 * BS + 0, 6 * BS + 1, 6 * BS + 2]
    assert not hasattr(batch, "order")


def test_only_leading_one_token_rows_count_as_decodes():
    batch = build_flat_batch([row("a", 4, 1, 0), row("b", 3, 3, 1)], BS, torch.device("cpu"))
    assert batch.meta.num_decodes == 1
    all_decodes = build_flat_batch([row("a", 4, 1, 0), row("b", 3, 1, 1)], BS, torch.device("cpu"))
    assert all_decodes.meta.num_decodes == 2


@pytest.mark.parametrize("step", [
    [row("a", 5, 5, 0), row("b", 3, 1, 2)],                      # a decode behind a prefill
    [row("a", 4, 1, 0), row("b", 5, 2, 1), row("c", 3, 1, 3)],   # one of two decodes behind
])
def test_a_one_token_row_behind_a_longer_one_is_refused(step):
    with pytest.raises(ValueError, match="one-token rows must lead"):
        build_flat_batch(step, BS, torch.device("cpu"))
