"""Sampler guards: no row can hurt another. Rows with extreme or non-finite parameters and
logits (parameters set past SamplingParams validation, as a bug or a Python caller could)
always get an id inside [0, V), and every normal row beside them (greedy or seeded, so
deterministic) gets exactly the token and logprobs it gets when sampled alone. A row whose
parameters or sampling raise fails alone, reported in SamplerOutput.failed."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.sampling.sampler as sampler_module
from gateway.sampling.batch import GATHER_FAILED, _Columns
from gateway.sampling.params import SamplingParams
from gateway.sampling.sampler import SAMPLING_FAILED, Sampler, SamplingBatch
from gateway.scheduler.sequence import Sequence

NAN, INF = float("nan"), float("inf")
EOS = 2


def unchecked(**fields) -> SamplingParams:
    """SamplingParams with fields set after validation: what a bug or a bypass could hand over."""
    params = SamplingParams(max_tokens=8)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def seq(params: SamplingParams, prompt=(3, 4, 5), output=(), request_id="r") -> Sequence:
    return Sequence(request_id, list(prompt) + list(output), params, num_prompt_tokens=len(prompt))


def sample(logits: torch.Tensor, seqs: list[Sequence], draw="auto"):
    return Sampler(draw)(logits, SamplingBatch.build(seqs, logits.shape[1], {EOS}, "cpu"))


# ---- strategies ----------------------------------------------------------------------------

hostile_params = st.fixed_dictionaries({}, optional={
    "repetition_penalty": st.sampled_from([1e-46, 1e39, 0.0, INF, NAN, 1e-30, 1.3]),
    "temperature": st.sampled_from([0.0, 1e-6, 1e-5, 1e39, INF, NAN, 0.7]),
    "min_tokens": st.sampled_from([0, 2]),
    "presence_penalty": st.sampled_from([1e39, -1e39, NAN, 2.0]),
    "frequency_penalty": st.sampled_from([1e39, -1e39, NAN, -2.0]),
    "logit_bias": st.dictionaries(st.integers(0, 40), st.sampled_from([1e30, -1e30, 1e39, -1e39, NAN, 100.0]),
                                  max_size=3),
    "top_p": st.sampled_from([0.0, 1e-9, 0.5, 1.0, NAN]),
    "top_k": st.sampled_from([0, 1, 5]),
    "min_p": st.sampled_from([0.0, 1.0, 1.5, NAN]),
    "seed": st.none() | st.integers(0, 2**32),
    "logprobs": st.sampled_from([None, 0, 3]),
})
# Deterministic rows: greedy, or seeded; top_k stays <= 5 so the batch's candidate count
# (max(256, largest top_k)) is the same alone and in company.
normal_params = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.7, 1.3]),
    "seed": st.integers(0, 2**32),
}, optional={
    "top_k": st.sampled_from([0, 5]), "top_p": st.sampled_from([1.0, 0.9]), "min_p": st.sampled_from([0.0, 0.05]),
    "repetition_penalty": st.sampled_from([1.0, 1.2]), "presence_penalty": st.sampled_from([0.0, 0.5]),
    "min_tokens": st.sampled_from([0, 2]), "logit_bias": st.dictionaries(st.integers(0, 40), st.floats(-5, 5), max_size=2),
    "logprobs": st.sampled_from([None, 2]),
})
# How a hostile row's logits are broken: NaN / +inf / -inf at some ids, everything NaN or -inf, huge.
hostile_logits = st.sampled_from(["normal", "nan_some", "posinf_some", "neginf_some", "all_nan", "all_neginf",
                                  "huge", "mixed"])


def make_row(kind: str, V: int, gen: torch.Generator) -> torch.Tensor:
    row = torch.randn(V, generator=gen) * 3
    some = torch.randint(0, V, (3,), generator=gen)
    if kind == "nan_some":
        row[some] = NAN
    elif kind == "posinf_some":
        row[some] = INF
    elif kind == "neginf_some":
        row[some] = -INF
    elif kind == "all_nan":
        row[:] = NAN
    elif kind == "all_neginf":
        row[:] = -INF
    elif kind == "huge":
        row *= 1e37
    elif kind == "mixed":
        row[some] = torch.tensor([NAN, INF, -INF])
    return row


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(vocab=st.sampled_from([50, 300, 1000]), draw=st.sampled_from(["auto", "race", "inverse_cdf"]),
       hostile=st.lists(st.tuples(hostile_params, hostile_logits), min_size=1, max_size=3),
       normal=st.lists(normal_params, min_size=1, max_size=3), order=st.randoms(use_true_random=False),
       data_seed=st.integers(0, 2**16))
def test_hostile_rows_get_valid_ids_and_leave_the_other_rows_bit_for_bit_alone(vocab, draw, hostile, normal,
                                                                             order, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    rows = [(unchecked(**fields), make_row(kind, vocab, gen), False) for fields, kind in hostile]
    rows += [(unchecked(**fields), make_row("normal", vocab, gen), True) for fields in normal]
    order.shuffle(rows)
    seqs = [seq(params, output=[7, 7, 9][:i % 3], request_id=f"r{i}") for i, (params, _, _) in enumerate(rows)]
    logits = torch.stack([row for _, row, _ in rows])
    before = logits.clone()

    out = sample(logits, seqs, draw)

    assert all(isinstance(t, int) and 0 <= t < vocab for t in out.token_ids), out.token_ids
    assert out.failed == {}
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())
    for i, (_, row, is_normal) in enumerate(rows):
        if is_normal:
            alone = sample(row.unsqueeze(0).clone(), [seqs[i]], draw)
            assert out.token_ids[i] == alone.token_ids[0], (i, rows[i][0])
            assert out.logprobs[i] == alone.logprobs[0]


# ---- the documented outcomes of the guards -------------------------------------------------

def test_nan_logits_count_as_absent_and_an_all_nan_row_falls_back_to_token_zero():
    row = torch.full((1, 10), NAN)
    row[0, 6] = -3.0
    assert sample(row, [seq(unchecked(temperature=0))]).token_ids == [6]
    assert sample(row, [seq(unchecked(temperature=1.0))]).token_ids == [6]   # the only finite candidate
    assert sample(torch.full((1, 10), NAN), [seq(unchecked(temperature=0.8))]).token_ids == [0]


def test_a_positive_infinite_logit_is_a_certain_token_and_logprobs_stay_finite():
    logits = torch.randn(1, 30)
    logits[0, 17] = INF
    for temperature in (0.0, 0.5, 1e-5):
        out = sample(logits, [seq(unchecked(temperature=temperature, logprobs=2))])
        assert out.token_ids == [17]
        assert out.logprobs[0].logprob == 0.0 and out.logprobs[0].top[0] == (17, 0.0)


def test_the_reported_hostile_parameters_give_ids_in_range_and_keep_min_tokens():
    """The reproduced finding: these made the sampler return id == V (every row's engine_dead)."""
    torch.manual_seed(0)
    V = 64
    logits = torch.randn(4, V)
    logits[:, 1] = 0.0          # 0 * inf = NaN under a penalty of 1e-46 (0 in float32) or 1e39 (inf)
    logits[:, EOS] = 30.0       # EOS is the argmax: min_tokens has to hold it back
    for fields in (dict(repetition_penalty=1e-46), dict(repetition_penalty=1e39), dict(temperature=1e39),
                   dict(temperature=1e39, min_tokens=2), dict(presence_penalty=1e39), dict(logit_bias={9: 1e39})):
        hostile = unchecked(**fields)
        out = sample(logits, [seq(hostile, prompt=(1, 3))] * 4)
        assert all(0 <= t < V for t in out.token_ids), (fields, out.token_ids)
        if hostile.min_tokens:
            assert EOS not in out.token_ids, fields
    forced = sample(logits[:1], [seq(unchecked(logit_bias={9: 1e39}, temperature=0.7))])
    assert forced.token_ids == [9]


def test_top_p_zero_and_min_p_one_keep_exactly_the_best_token_beside_a_nan_row():
    logits = torch.randn(17, 500, generator=torch.Generator().manual_seed(1))
    logits[16] = NAN
    best = logits[:16].argmax(-1).tolist()
    for fields in (dict(top_p=0.0), dict(top_p=1e-9), dict(min_p=1.0)):
        out = sample(logits, [seq(unchecked(temperature=1.5, **fields)) for _ in range(17)])
        assert out.token_ids == best + [0], fields


# ---- faults raised by one row --------------------------------------------------------------

MARK = 0.0123   # a min_p value that makes the injected faults fire for its row


def _company(n: int, V: int):
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(5))
    params = [unchecked(temperature=0) if i % 2 else unchecked(temperature=0.9, seed=i) for i in range(n)]
    return logits, params


def test_a_row_whose_parameters_cannot_be_gathered_fails_alone(monkeypatch):
    add = _Columns.add

    def flaky(self, row, s, vocab_size, eos):
        if s.params.min_p == MARK:
            raise TypeError("injected gathering fault")
        return add(self, row, s, vocab_size, eos)
    monkeypatch.setattr(_Columns, "add", flaky)
    logits, params = _company(5, 200)
    params[2] = unchecked(min_p=MARK, logit_bias={3: 1.0}, repetition_penalty=1.5, seed=1)
    seqs = [seq(p) for p in params]
    out = sample(logits, seqs)
    assert out.failed == {2: GATHER_FAILED}
    assert 0 <= out.token_ids[2] < 200
    for i in (0, 1, 3, 4):
        assert out.token_ids[i] == sample(logits[i:i + 1], [seqs[i]]).token_ids[0]


def test_a_row_that_makes_the_batched_sampler_raise_fails_alone(monkeypatch):
    draw = sampler_module._draw
    calls = []

    def flaky(logits, b, how, safe):
        calls.append(b.num_rows)
        if MARK in b.columns.min_p:
            raise RuntimeError("injected sampling fault")
        return draw(logits, b, how, safe)
    monkeypatch.setattr(sampler_module, "_draw", flaky)
    logits, params = _company(6, 300)
    params[4] = unchecked(min_p=MARK, temperature=0.8)
    seqs = [seq(p) for p in params]
    out = sample(logits, seqs)
    assert out.failed == {4: SAMPLING_FAILED}
    assert 0 <= out.token_ids[4] < 300 and max(calls) == 6   # the fault fired in the full batch
    for i in (0, 1, 2, 3, 5):
        assert out.token_ids[i] == sample(logits[i:i + 1], [seqs[i]]).token_ids[0]


@pytest.mark.parametrize("bad", [dict(repetition_penalty=INF), dict(temperature=NAN)])
def test_no_fault_is_reported_for_rows_the_guards_repair(bad):
    logits, params = _company(3, 100)
    params[1] = unchecked(**bad)
    out = sample(logits, [seq(p) for p in params])
    assert out.failed == {} and all(0 <= t < 100 for t in out.token_ids)
    assert not any(lp is not None and math.isnan(lp.logprob) for lp in out.logprobs)
