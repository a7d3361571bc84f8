"""Scheduler: token budget, chunked prefill, decodes before prefills, preemption of the
newest by recompute, abort, and every block coming back. Tiny pools, exact expectations."""

import pytest

from gateway.scheduler.scheduler import Scheduler, SchedulerOutput
from gateway.scheduler.sequence import Sequence, SequenceStatus

SAMPLED = 999


def make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32,
                   num_blocks=8, block_size=4, enable_prefix_caching=True,
                   max_prefill_tokens_with_decodes=None) -> Scheduler:
    return Scheduler(max_num_seqs, max_num_batched_tokens, max_model_len,
                     num_blocks, block_size, enable_prefix_caching, max_prefill_tokens_with_decodes)


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
