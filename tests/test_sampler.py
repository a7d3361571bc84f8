"""Sampler: each SamplingParams field changes the draw exactly as documented, and
sampling is vectorized, seed-reproducible and copies to the host once."""

import math

import pytest
import torch

from gateway.sampling.params import SamplingParams as P
from gateway.sampling.sampler import Sampler, SamplingBatch, _sorted_thresholds, _truncate
from gateway.scheduler.sequence import Sequence

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DRAWS = ["race", "inverse_cdf"]


def seq(params: P, prompt=(1,), output=()) -> Sequence:
    return Sequence("r", list(prompt) + list(output), params, num_prompt_tokens=len(prompt))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos=(), device="cpu", draw="auto"):
    batch = SamplingBatch.build(seqs, logits.shape[1], set(eos), device)
    return Sampler(draw)(logits.to(device), batch)


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


def rows(logit_row: torch.Tensor, n: int) -> torch.Tensor:
    return logit_row.unsqueeze(0).repeat(n, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_argmax_even_beside_random_rows(device):
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    params = [P(temperature=0) if i % 2 == 0 else P(temperature=1.5) for i in range(8)]
    out = sample(logits, [seq(p) for p in params], device=device)
    expected = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in range(0, 8, 2)] == expected[0::2]
    assert out.logprobs == [None] * 8


def test_sampler_leaves_callers_logits_untouched():
    logits = torch.randn(2, 50)
    before = logits.clone()
    sample(logits, [seq(P(logit_bias={3: 50}, repetition_penalty=2.0)), seq(P(presence_penalty=1.0), output=[4])])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("draw", DRAWS)
def test_draws_follow_the_softmax_distribution(draw):
    n = 8000
    out = sample(rows(probs_logits(0.5, 0.25, 0.125, 0.125), n), [seq(P()) for _ in range(n)], draw=draw)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.125, 0.125]), atol=0.025)


def _seeded_run(seed: int, steps: int, logits_row: torch.Tensor, company: int, draw="auto") -> list[int]:
    """Sample `steps` tokens for one seeded request placed at row `company` of a batch
    whose other rows are unseeded random requests at other output positions."""
    target = seq(P(seed=seed))
    for _ in range(steps):
        others = [seq(P(temperature=1.3), output=[2] * (i + 3)) for i in range(company)]
        batch_seqs = others[: company // 2] + [target] + others[company // 2:]
        out = sample(rows(logits_row, len(batch_seqs)), batch_seqs, draw=draw)
        target.append_token(out.token_ids[company // 2])
    return target.output_token_ids


@pytest.mark.parametrize("draw", DRAWS)
def test_seed_reproduces_tokens_alone_and_inside_any_batch(draw):
    flat = torch.zeros(2000)
    alone = _seeded_run(7, 12, flat, company=0, draw=draw)
    assert _seeded_run(7, 12, flat, company=5, draw=draw) == alone
    assert _seeded_run(7, 12, flat, company=9, draw=draw) == alone
    assert len(set(alone)) > 6                      # noise moves with the output position
    assert _seeded_run(8, 12, flat, company=0, draw=draw) != alone


def test_seed_depends_on_output_position_so_resume_after_preemption_matches():
    logits = torch.zeros(1, 2000)
    fresh = sample(logits, [seq(P(seed=3), prompt=[5, 6], output=[9, 9, 9])]).token_ids
    # Recomputed after preemption: same tokens, same position, new Sequence object.
    resumed = sample(logits, [seq(P(seed=3), prompt=[5, 6], output=[9, 9, 9])]).token_ids
    later = sample(logits, [seq(P(seed=3), prompt=[5, 6], output=[9, 9, 9, 9])]).token_ids
    assert fresh == resumed
    assert fresh != later


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_is_greedy_even_at_high_temperature(device):
    logits = torch.randn(32, 1000, generator=torch.Generator().manual_seed(1))
    out = sample(logits, [seq(P(temperature=2.0, top_k=1)) for _ in range(32)], device=device)
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("draw", DRAWS)
def test_top_k_keeps_exactly_the_k_best_tokens(draw):
    logits = rows(probs_logits(0.3, 0.25, 0.2, 0.15, 0.1), 3000)
    out = sample(logits, [seq(P(top_k=3)) for _ in range(3000)], draw=draw)
    assert set(out.token_ids) == {0, 1, 2}


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_top_p_is_argmax(device):
    logits = torch.randn(32, 1000, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [seq(P(temperature=1.5, top_p=1e-6)) for _ in range(32)], device=device)
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("draw", DRAWS)
def test_top_p_keeps_the_smallest_set_reaching_p(draw):
    out = sample(rows(probs_logits(0.4, 0.3, 0.2, 0.1), 3000), [seq(P(top_p=0.5)) for _ in range(3000)], draw=draw)
    assert set(out.token_ids) == {0, 1}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top_k=2 the probabilities are 4/7 and 3/7, so top_p=0.5 keeps token 0 alone.
    out = sample(rows(probs_logits(0.4, 0.3, 0.2, 0.1), 500), [seq(P(top_k=2, top_p=0.5)) for _ in range(500)])
    assert set(out.token_ids) == {0}


@pytest.mark.parametrize("draw", DRAWS)
def test_top_p_on_a_flat_distribution_reaches_past_the_candidates(draw):
    # Falling slowly: the nucleus holds ~1000 tokens, far beyond the 256 topk candidates.
    logit_row = torch.linspace(1.0, 0.0, 2000)
    desc = logit_row.softmax(-1)
    nucleus = int(((desc.cumsum(-1) - desc) < 0.6).sum())
    out = sample(rows(logit_row, 2000), [seq(P(top_p=0.6)) for _ in range(2000)], draw=draw)
    assert max(out.token_ids) < nucleus
    assert max(out.token_ids) > nucleus - 50


@pytest.mark.parametrize("device", DEVICES)
def test_truncation_matches_a_full_sort_for_peaked_and_flat_rows(device):
    # Scales from 0.001 (flat: the nucleus needs the full sort) to 8 (a few candidates).
    V, gen = 6000, torch.Generator().manual_seed(4)
    scale = torch.tensor([0.001, 0.3, 1.0, 8.0]).repeat_interleave(4).unsqueeze(1)
    logits = (torch.randn(16, V, generator=gen) * scale).to(device)
    # Every scale meets every setting; 6 rows pass 256 candidates, 3 of those pass 4096 too.
    settings = [dict(), dict(top_k=5, top_p=0.9), dict(top_p=0.5), dict(top_p=0.99)]
    params = [P(**settings[(i + i // 4) % 4]) for i in range(16)]
    batch = SamplingBatch.build([seq(p) for p in params], V, set(), device)
    got = _truncate(logits, batch)
    top_k = batch.top_k if batch.top_k is not None else torch.full((16, 1), V, device=device)
    want = logits.masked_fill(logits < _sorted_thresholds(logits, top_k, batch.top_p), float("-inf"))
    assert torch.equal(got.isinf(), want.isinf())
    assert (~got.isinf()).sum() < 16 * V / 2          # the rows really were truncated


@pytest.mark.parametrize("draw", DRAWS)
def test_min_p_drops_tokens_below_fraction_of_the_best(draw):
    # min_p=0.4 → cutoff 0.4 * 0.5 = 0.2: tokens 2 (0.15) and 3 (0.05) go; the rest renormalise.
    n = 8000
    out = sample(rows(probs_logits(0.5, 0.3, 0.15, 0.05), n), [seq(P(min_p=0.4)) for _ in range(n)], draw=draw)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.025)


def test_presence_penalty_is_subtracted_once_per_present_output_token():
    logits = torch.tensor([[1.0, 0.8, 0.5]])
    # token 0 occurs twice in the output: 1.0 - 0.15 = 0.85 still beats 0.8 (not 1.0 - 0.3).
    keeps = sample(logits, [seq(P(temperature=0, presence_penalty=0.15), output=[0, 0])])
    flips = sample(logits, [seq(P(temperature=0, presence_penalty=0.25), output=[0, 0])])
    assert (keeps.token_ids, flips.token_ids) == ([0], [1])


def test_frequency_penalty_scales_with_the_count_in_the_output():
    logits = torch.tensor([[1.0, 0.8, 0.5]])
    twice = sample(logits, [seq(P(temperature=0, frequency_penalty=0.15), output=[0, 0])])   # 0.70
    once = sample(logits, [seq(P(temperature=0, frequency_penalty=0.15), output=[0])])       # 0.85
    prompt_only = sample(logits, [seq(P(temperature=0, frequency_penalty=2.0), prompt=[0, 0])])
    assert (twice.token_ids, once.token_ids, prompt_only.token_ids) == ([1], [0], [0])


def test_penalised_logprobs_follow_the_openai_formula_exactly():
    logits = torch.tensor([[1.0, 0.8, 0.5, 0.1]])
    p = P(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=4)
    out = sample(logits, [seq(p, output=[0, 0, 2])])
    expected = torch.tensor([1.0 - 0.5 - 0.5, 0.8, 0.5 - 0.5 - 0.25, 0.1]).log_softmax(-1)
    top = out.logprobs[0].top
    assert [t for t, _ in top] == [1, 3, 0, 2]
    assert [v for _, v in top] == pytest.approx(expected[[1, 3, 0, 2]].tolist())


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    # token 0 seen in the prompt, token 2 in the output; token 1 and 3 unseen.
    out = sample(logits, [seq(P(temperature=0, repetition_penalty=1.5, logprobs=0), prompt=[0], output=[2])])
    expected = torch.tensor([2.0 / 1.5, 1.5, -1.0 * 1.5, -1.2]).log_softmax(-1)
    assert out.token_ids == [1]
    assert out.logprobs[0].logprob == pytest.approx(expected[1].item())


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(5))
    forced = sample(logits, [seq(P(temperature=1.0, logit_bias={42: 100})) for _ in range(16)])
    best = int(logits[0].argmax())
    banned = sample(logits[:1], [seq(P(temperature=0, logit_bias={best: -100}))])
    assert forced.token_ids == [42] * 16
    assert banned.token_ids == [int(logits[0].topk(2).indices[1])]


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])          # eos=0, stop token 1
    p = P(temperature=0, min_tokens=2, stop_token_ids=[1])
    early = sample(logits, [seq(p, output=[3])], eos={0})
    reached = sample(logits, [seq(p, output=[3, 3])], eos={0})
    assert (early.token_ids, reached.token_ids) == ([2], [0])


def test_logprobs_are_log_softmax_before_temperature_with_sorted_alternatives():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(6))
    params = [P(temperature=1.7, logprobs=5), P(temperature=0), P(temperature=0.3, top_k=10, logprobs=0)]
    out = sample(logits, [seq(p) for p in params])
    ref = logits.log_softmax(-1)
    lp0, lp2 = out.logprobs[0], out.logprobs[2]
    assert out.logprobs[1] is None
    assert lp0.token_id == out.token_ids[0]
    assert lp0.logprob == pytest.approx(ref[0, out.token_ids[0]].item(), abs=1e-5)
    assert [t for t, _ in lp0.top] == ref[0].topk(5).indices.tolist()
    assert [v for _, v in lp0.top] == pytest.approx(ref[0].topk(5).values.tolist(), abs=1e-5)
    assert lp2.top == [] and lp2.logprob == pytest.approx(ref[2, out.token_ids[2]].item(), abs=1e-5)


def test_default_params_skip_every_optional_stage():
    batch = SamplingBatch.build([seq(P()), seq(P(temperature=0))], 100, {0}, "cpu")
    optional = [batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.presence, batch.frequency,
                batch.counts, batch.repetition, batch.seen, batch.bias, batch.banned, batch.logprob_index]
    assert all(x is None for x in optional)
    assert not batch.mutates_logits and batch.any_greedy and not batch.all_greedy


def test_a_step_copies_to_the_host_once(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or real(t))
    logits = torch.randn(4, 300)
    params = [P(logprobs=3, top_p=0.9), P(temperature=0, logprobs=1), P(seed=1, min_p=0.1), P(top_k=4)]
    out = sample(logits, [seq(p) for p in params])
    assert len(calls) == 1 and len(out.token_ids) == 4 and not math.isnan(out.logprobs[0].logprob)
