"""Scheduler: token budget, chunked prefill, decodes before prefills, preemption of the
newest by recompute, abort, and every block coming back. Tiny pools, exact expectations."""

import pytest

from gateway.scheduler.scheduler import Scheduler, SchedulerOutput
from gateway.sampling.params import SamplingParams
from gateway.scheduler.sequence import Sequence, SequenceStatus

SAMPLED = 999


def make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32,
                   num_blocks=8, block_size=4, enable_prefix_caching=True,
                   max_prefill_tokens_with_decodes=None, admission_headroom_tokens=0) -> Scheduler:
    """Headroom 0 by default: most tests here pin down budget, chunking and preemption on
    pools packed to the last block; the admission-headroom tests at the end set it."""
    return Scheduler(max_num_seqs, max_num_batched_tokens, max_model_len,
                     num_blocks, block_size, enable_prefix_caching, max_prefill_tokens_with_decodes,
                     admission_headroom_tokens)


def step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step with a model that always samples SAMPLED."""
    output = scheduler.schedule()
    scheduler.update(output, [SAMPLED if row.samples else None for row in output.scheduled])
    return output


def rows(output: SchedulerOutput) -> list[tuple[str, int]]:
    return [(row.seq.request_id, row.num_new_tokens) for row in output.scheduled]


def test_a_prompt_is_prefilled_in_one_step_then_decoded_one_token_a_step():
    scheduler = make_scheduler()
    seq = Sequence("a", list(range(10)))
    scheduler.add(seq)
    first = step(scheduler)
    assert rows(first) == [("a", 10)] and first.scheduled[0].samples
    assert seq.block_table == [0, 1, 2] and seq.status is SequenceStatus.RUNNING
    assert seq.token_ids[-1] == SAMPLED and seq.num_computed_tokens == 10
    assert rows(step(scheduler)) == [("a", 1)]
    assert seq.num_tokens == 12 and seq.num_computed_tokens == 11


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=5)
    seq = Sequence("a", list(range(12)))
    scheduler.add(seq)
    chunks = []
    for _ in range(3):
        output = step(scheduler)
        chunks.append((rows(output)[0][1], output.scheduled[0].samples, list(seq.block_table)))
    assert chunks == [(5, False, [0, 1]), (5, False, [0, 1, 2]), (2, True, [0, 1, 2])]
    assert seq.num_tokens == 13 and seq.output_token_ids == [SAMPLED]


def test_a_short_prompt_waits_until_the_chunked_one_leaves_budget_over():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=5)
    scheduler.add(Sequence("a", list(range(12))))
    scheduler.add(Sequence("b", [1, 2, 3]))
    assert [rows(step(scheduler)) for _ in range(4)] == [
        [("a", 5)], [("a", 5)], [("a", 2), ("b", 3)], [("a", 1), ("b", 1)]]


def test_decodes_are_scheduled_before_waiting_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=5)
    scheduler.add(Sequence("a", [1, 2, 3]))
    step(scheduler)
    scheduler.add(Sequence("b", list(range(10))))
    output = step(scheduler)
    assert rows(output) == [("a", 1), ("b", 4)]
    assert output.num_batched_tokens == 5


def test_prefill_chunks_are_capped_while_decodes_share_the_step():
    scheduler = make_scheduler(max_prefill_tokens_with_decodes=6)
    scheduler.add(Sequence("a", list(range(4))))
    assert rows(step(scheduler)) == [("a", 4)]              # no decodes yet: the whole budget
    scheduler.add(Sequence("b", list(range(100, 115))))
    scheduler.add(Sequence("c", list(range(200, 203))))
    assert rows(step(scheduler)) == [("a", 1), ("b", 6)]    # a decodes: b gets 6, c waits
    assert rows(step(scheduler)) == [("a", 1), ("b", 6)]
    assert rows(step(scheduler)) == [("a", 1), ("b", 3), ("c", 3)]   # the cap spans admissions
    scheduler.abort("a")
    scheduler.abort("b")
    scheduler.add(Sequence("d", list(range(300, 315))))
    assert rows(step(scheduler)) == [("c", 1), ("d", 6)]    # c now decodes: d is capped
    scheduler.abort("c")
    assert rows(step(scheduler)) == [("d", 9)]              # alone again: the rest of d at once


def test_one_token_rows_lead_the_batch():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    scheduler.add(Sequence("a", list(range(12))))
    step(scheduler)
    scheduler.add(Sequence("c", [5, 5]))
    scheduler.add(Sequence("b", list(range(12)) + [7]))    # hits 3 blocks, 1 token left
    scheduler.add(Sequence("d", list(range(8)) + [1, 1]))  # hits 2 blocks, 2 tokens left
    assert rows(step(scheduler)) == [("a", 1), ("b", 1), ("c", 2), ("d", 2)]


def test_max_num_seqs_caps_the_running_sequences():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(Sequence(name, [1, 2]))
    assert rows(step(scheduler)) == [("a", 2), ("b", 2)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


def test_the_newest_running_sequence_is_preempted_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    a, b, c = Sequence("a", [1] * 7), Sequence("b", [2] * 7), Sequence("c", [3])
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)                     # a: blocks 0 1, b: blocks 2 3, 8 tokens each
    step(scheduler)                     # 9 tokens each: both need a third block
    scheduler.add(c)
    output = step(scheduler)
    assert rows(output) == [("a", 1)] and output.preempted == [b]
    assert output.num_preemptions == 1
    assert a.block_table == [0, 1, 3]   # b's tail block was evicted first
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.num_preemptions == 1
    assert list(scheduler.waiting) == [b, c]   # front of the queue; c not admitted this step
    assert scheduler.num_free_blocks == 1


def test_a_preempted_sequence_resumes_from_its_surviving_prefix_blocks():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    a, b, c = Sequence("a", [1] * 7), Sequence("b", [2] * 7), Sequence("c", [3, 3])
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    step(scheduler)
    scheduler.add(c)
    step(scheduler)                     # b preempted; a took b's tail block 3
    first_scheduled = b.first_scheduled_time
    scheduler.finish(a, "stop")
    output = step(scheduler)
    assert rows(output) == [("b", 5), ("c", 2)]
    assert b.block_table == [2, 3, 1] and b.num_cached_tokens == 4
    assert (output.prefix_cache_queries, output.prefix_cache_hits) == (9 + 2, 4)
    assert b.first_scheduled_time == first_scheduled


def test_a_sequence_that_is_itself_the_newest_preempts_itself():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    a, b = Sequence("a", [1] * 5), Sequence("b", [2] * 8)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)                     # a: 0 1 (6 tokens), b: 2 3 (9 tokens)
    output = step(scheduler)
    assert rows(output) == [("a", 1)] and output.preempted == [b]
    assert a.block_table == [0, 1] and scheduler.num_free_blocks == 2
    assert list(scheduler.waiting) == [b]


def test_prefix_cache_queries_and_hits_are_reported_per_step_in_tokens():
    scheduler = make_scheduler()
    scheduler.add(Sequence("a", list(range(10))))
    first = step(scheduler)
    assert (first.prefix_cache_queries, first.prefix_cache_hits) == (10, 0)
    scheduler.add(Sequence("b", list(range(8)) + [70, 71, 72]))
    second = step(scheduler)
    assert (second.prefix_cache_queries, second.prefix_cache_hits) == (11, 8)
    assert rows(second) == [("a", 1), ("b", 3)]
    assert (step(scheduler).prefix_cache_queries, scheduler.block_pool.ref_count(0)) == (0, 2)


def test_abort_frees_a_running_sequence_at_once():
    scheduler = make_scheduler()
    seq = Sequence("a", list(range(10)))
    scheduler.add(seq)
    step(scheduler)
    assert scheduler.abort("a") is seq
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
    assert scheduler.num_free_blocks == 8 and not scheduler.has_unfinished
    assert scheduler.abort("a") is None and scheduler.abort("never-seen") is None


def test_abort_removes_a_waiting_sequence_from_the_queue():
    scheduler = make_scheduler()
    scheduler.add(Sequence("a", [1]))
    scheduler.add(Sequence("b", [2]))
    scheduler.abort("a")
    assert [s.request_id for s in scheduler.waiting] == ["b"]


def test_a_sequence_aborted_while_its_step_ran_is_skipped_by_update():
    scheduler = make_scheduler()
    seq = Sequence("a", [1, 2, 3])
    scheduler.add(seq)
    output = scheduler.schedule()
    scheduler.abort("a")
    scheduler.update(output, [SAMPLED])
    assert seq.token_ids == [1, 2, 3] and scheduler.num_free_blocks == 8


def test_finish_records_the_reason_and_frees_the_blocks():
    scheduler = make_scheduler()
    seq = Sequence("a", list(range(6)))
    scheduler.add(seq)
    step(scheduler)
    scheduler.finish(seq, "length")
    assert seq.finish_reason == "length" and scheduler.num_running == 0
    assert scheduler.num_free_blocks == 8 and scheduler.kv_cache_usage == 0.0


def test_every_block_is_free_once_all_sequences_finish_or_abort():
    scheduler = make_scheduler(num_blocks=6, max_num_batched_tokens=6, max_model_len=24)
    seqs = [Sequence(str(i), [i % 2] * (3 + 2 * i)) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(6):
        step(scheduler)
    assert scheduler.kv_cache_usage > 0
    for seq in seqs[:2]:
        if not seq.is_finished:
            scheduler.finish(seq, "stop")
    for seq in seqs[2:]:
        scheduler.abort(seq.request_id)
    assert scheduler.num_free_blocks == scheduler.num_total_blocks == 6
    assert not scheduler.has_unfinished
    scheduler.block_pool.check_invariants()


def test_update_needs_one_entry_per_scheduled_row():
    scheduler = make_scheduler()
    scheduler.add(Sequence("a", [1]))
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="0 sampled tokens for 1 scheduled"):
        scheduler.update(output, [])


def test_a_prompt_longer_than_max_model_len_is_rejected_at_add():
    scheduler = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match=r"33 tokens.*max_model_len \(32\)"):
        scheduler.add(Sequence("a", [0] * 33))
    assert not scheduler.has_unfinished


def test_a_request_id_can_only_be_added_once_while_unfinished():
    scheduler = make_scheduler()
    scheduler.add(Sequence("a", [1]))
    with pytest.raises(ValueError, match="already"):
        scheduler.add(Sequence("a", [2]))


def test_a_max_model_len_the_pool_cannot_hold_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"holds 32 tokens.*max_model_len is 33"):
        make_scheduler(max_model_len=33, num_blocks=8, block_size=4)


def test_a_token_budget_below_max_num_seqs_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(3\) must be >= max_num_seqs \(4\)"):
        make_scheduler(max_num_seqs=4, max_num_batched_tokens=3)


# ---- admission under KV pressure (issue 21) ----------------------------------------------

def run_to_end(scheduler: Scheduler, seqs: list[Sequence], limit: int = 40) -> list[SchedulerOutput]:
    """Steps until everything finished, ending each sequence at max_tokens as the engine does."""
    outputs = []
    while scheduler.has_unfinished and len(outputs) < limit:
        outputs.append(step(scheduler))
        for seq in seqs:
            if not seq.is_finished and seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
    return outputs


def test_a_prompt_that_cannot_fit_beside_the_running_one_waits_instead_of_thrashing():
    # 8 blocks of 4: a grows to 6 blocks, b's prompt needs 5. b's first chunk (4 tokens) would
    # fit beside a; admitted, it was preempted again after a grew, and recomputed.
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32, num_blocks=8,
                          block_size=4, enable_prefix_caching=False, max_prefill_tokens_with_decodes=4)
    a, b = Sequence("a", [1] * 8, SamplingParams(max_tokens=16)), Sequence("b", [2] * 20, SamplingParams(max_tokens=2))
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    outputs = run_to_end(scheduler, [a, b])
    assert [rows(o) for o in outputs[:15]] == [[("a", 1)]] * 15   # b waits while a runs...
    assert [rows(o) for o in outputs[15:]] == [[("b", 8)], [("b", 8)], [("b", 4)], [("b", 1)]]
    assert sum(o.num_preemptions for o in outputs) == 0 and sum(o.num_recomputed_tokens for o in outputs) == 0
    assert b.block_table == [] and b.output_token_ids == [SAMPLED] * 2 and b.num_preemptions == 0
    assert scheduler.num_free_blocks == 8


@pytest.mark.parametrize("num_blocks, b_blocks", [(9, [6]), (8, [7])])
def test_admission_leaves_room_for_the_running_sequences_next_tokens(num_blocks, b_blocks):
    # a (20-token prompt, max_tokens 8) holds 6 blocks after its first decode and will need a
    # 7th within the headroom (2 blocks' worth of tokens); b needs 1 block now and 2 at its end.
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32,
                          num_blocks=num_blocks, block_size=4)
    a, b = Sequence("a", [1] * 20, SamplingParams(max_tokens=8)), Sequence("b", [2] * 4, SamplingParams(max_tokens=2))
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    outputs = [step(scheduler)]
    admitted_at_once = num_blocks == 9   # 3 free: 1 for b's prompt, 1 for a's next, 1 for b's next
    assert rows(outputs[0]) == ([("a", 1), ("b", 4)] if admitted_at_once else [("a", 1)])
    while not b.block_table:            # else b waits for a to finish
        outputs += run_to_end(scheduler, [a, b], limit=1)
    assert b.block_table == b_blocks and a.is_finished is not admitted_at_once
    outputs += run_to_end(scheduler, [a, b])
    assert sum(o.num_preemptions for o in outputs) == 0
    assert a.is_finished and b.is_finished and scheduler.num_free_blocks == num_blocks


def test_an_idle_scheduler_admits_a_prompt_however_little_room_it_leaves():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=32, num_blocks=8, block_size=4)
    a = Sequence("a", [1] * 30, SamplingParams(max_tokens=2))
    scheduler.add(a)
    assert rows(step(scheduler)) == [("a", 30)] and a.block_table == [0, 1, 2, 3, 4, 5, 6, 7]


def test_recomputed_tokens_are_the_ones_a_preemption_dropped_minus_the_prefix_hit():
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    a, b, c = Sequence("a", [1] * 7), Sequence("b", [2] * 7), Sequence("c", [3, 3])
    for seq in (a, b):
        scheduler.add(seq)
    outputs = [step(scheduler), step(scheduler)]
    scheduler.add(c)
    outputs.append(step(scheduler))     # b preempted with 8 tokens computed
    scheduler.finish(a, "stop")
    outputs.append(step(scheduler))     # b back: block 2 (4 tokens) hit, positions 4..8 computed
    assert [o.num_recomputed_tokens for o in outputs] == [0, 0, 0, 4]
    assert rows(outputs[-1]) == [("b", 5), ("c", 2)] and b.recompute_until == 8
    assert step(scheduler).num_recomputed_tokens == 0   # position 9 is new
