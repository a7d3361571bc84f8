"""Constrained decoding (sampling/grammar.py): the per-sequence llguidance state and the mask the
sampler applies. Random logits through the real sampler under greedy, top-p, top-k and seeded
sampling must always produce output that validates against the schema; unconstrained rows in
the same batch are untouched and a batch without a grammar builds no mask at all; EOS is
allowed exactly when the grammar accepts; a state rebuilt from its output tokens equals the one
that advanced; and through the engine (a tiny random-weight model) a pool small enough to
preempt gives the same constrained tokens as one that fits, and finishing or aborting drops the
state."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from gateway.engine.llm import LLM
from gateway.models.loader import load_tokenizer, resolve_source
from gateway.sampling.batch import SamplingBatch, grammar_mask
from gateway.sampling.grammar import GrammarFactory, grammar_key
from gateway.sampling.params import SamplingParams, SamplingParamsError
from gateway.sampling.sampler import Sampler
from gateway.scheduler.sequence import Sequence

V, EOS = 49152, 2
# Every value is bounded, so any path through the grammar ends within a few dozen tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 4},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def grammars(default_model_dir):
    tokenizer = load_tokenizer(resolve_source(str(default_model_dir), default_model_dir))
    return GrammarFactory(tokenizer, V, {EOS}), tokenizer


def constrained(grammars, params: SamplingParams, prompt=(1, 5, 9)) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    seq.grammar = grammars[0].new_state(params.grammar_key)
    return seq


def run_to_end(grammars, seqs: list[Sequence], steps: int = 200, scale: float = 4.0) -> list[str]:
    """Sample random logits for every row until each constrained row's grammar stops; the
    unconstrained rows must get exactly what they would alone. Returns the constrained texts."""
    sampler, gen = Sampler(), torch.Generator().manual_seed(0)
    for _ in range(steps):
        live = [s for s in seqs if s.grammar is None or not s.grammar.is_stopped]
        if all(s.grammar is None for s in live):
            break
        logits = torch.randn((len(live), V), generator=gen) * scale
        out = sampler(logits, SamplingBatch.build(live, V, {EOS}, "cpu"))
        assert not out.failed
        for i, (seq, token) in enumerate(zip(live, out.token_ids)):
            if seq.grammar is None:
                assert token == int(logits[i].argmax())   # greedy, unconstrained: the raw argmax
                continue
            assert seq.grammar.advance(token), seq.grammar.error
            seq.append_token(token)
    else:
        raise AssertionError("a bounded grammar did not stop")
    tokenizer = grammars[1]
    return [tokenizer.decode([t for t in s.output_token_ids if t != EOS]) for s in seqs if s.grammar is not None]


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=1.0, top_p=0.5), dict(temperature=1.0, seed=7),
    dict(temperature=1.5, top_k=5), dict(temperature=1.0, logprobs=3, presence_penalty=1.0),
])
def test_sampled_output_always_validates(grammars, kwargs):
    params = SamplingParams(max_tokens=200, json_schema=SCHEMA, **kwargs)
    seqs = [constrained(grammars, params), Sequence("u", [1, 2, 3], SamplingParams(temperature=0))]
    (text,) = run_to_end(grammars, seqs)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_n2_states_are_independent_and_both_validate(grammars):
    a, b = (constrained(grammars, SamplingParams(max_tokens=200, temperature=1.0, seed=s, json_schema=SCHEMA))
            for s in (1, 2))
    assert a.grammar.matcher is not b.grammar.matcher
    texts = run_to_end(grammars, [a, b])
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert a.grammar.consumed == a.num_output_tokens and b.grammar.consumed == b.num_output_tokens


def test_logprobs_see_the_constrained_distribution(grammars):
    seq = constrained(grammars, SamplingParams(temperature=0, logprobs=5, json_schema=SCHEMA))
    out = Sampler()(torch.randn((1, V)), SamplingBatch.build([seq], V, {EOS}, "cpu"))
    lp = out.logprobs[0]
    # The only legal first token spells `{`: every alternative with a finite logprob is allowed.
    allowed = grammar_mask([seq.grammar], V, "cpu")[0]
    assert allowed[out.token_ids[0]]
    finite = [t for t, v in lp.top if v > float("-inf")]
    assert finite and all(allowed[t] for t in finite)
    assert lp.logprob > -1e-3   # the mass is on the allowed tokens alone (here, nearly all on one)


def test_unconstrained_batch_builds_no_mask():
    batch = SamplingBatch.build([Sequence("u", [1, 2], SamplingParams())], V, {EOS}, "cpu")
    assert batch.allowed is None and batch.grammar_index is None and not batch.mutates_logits


def test_eos_allowed_exactly_when_the_grammar_accepts(grammars):
    state = grammars[0].new_state(grammar_key(SCHEMA))
    ids = grammars[1].encode('{"name":"ab","n":5,"ok":true}', add_special_tokens=False)
    for token in ids:
        mask = grammar_mask([state], V, "cpu")[0]
        assert bool(mask[EOS]) == state.is_accepting
        assert mask[token] and state.advance(token)
    assert state.is_accepting and state.is_stopped
    assert grammar_mask([state], V, "cpu")[0].nonzero().flatten().tolist() == [EOS]


def test_sync_rebuilds_the_state_from_the_output(grammars):
    ids = grammars[1].encode('{"name":"ab","n":57,"ok":false}', add_special_tokens=False)
    key = grammar_key(SCHEMA)
    for keep in (0, 3, len(ids)):
        advanced, rebuilt = grammars[0].new_state(key), grammars[0].new_state(key)
        for t in ids:
            advanced.advance(t)
        advanced.sync(ids[:keep])        # output rewritten to fewer tokens
        rebuilt.sync(ids[:keep])         # a fresh state caught up from the tokens
        fresh = grammars[0].new_state(key)
        for t in ids[:keep]:
            fresh.advance(t)
        expected = grammar_mask([fresh], V, "cpu")
        assert torch.equal(grammar_mask([advanced, rebuilt], V, "cpu"), expected.expand(2, -1))


def test_bad_schema_is_a_param_error():
    with pytest.raises(SamplingParamsError, match="Invalid type: foo") as err:
        SamplingParams(json_schema={"type": "foo"})
    assert err.value.param == "json_schema"
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(regex="(")
    assert err.value.param == "regex"


def _generate(llm: LLM, params: list[SamplingParams]) -> tuple[list[list[int]], int]:
    preemptions, original = [], llm.core.step

    def step():
        outputs, stats = original()
        preemptions.append(stats.num_preemptions)
        return outputs, stats

    llm.core.step = step
    results = llm.generate([[5 + i, 6, 7, 8, 9] for i in range(len(params))], params)
    return [r.token_ids for r in results], sum(preemptions)


def test_engine_grammar_across_preemption_and_abort(tiny_llama_dir):
    params = [SamplingParams(max_tokens=58, temperature=t, seed=i, json_schema=SCHEMA)
              for i, t in enumerate((0, 0, 1.0, 1.0, 0, 1.0))]
    with LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=4, max_model_len=64) as roomy:
        expected, none = _generate(roomy, params)
        rid = roomy._submit([5, 6, 7], params[0], chat=False)
        seq = roomy.core.requests[rid].seq
        roomy.core.step()
        assert seq.grammar is not None and seq.grammar.consumed == seq.num_output_tokens == 1
        roomy.core.abort(rid)
        assert seq.grammar is None
    with LLM(str(tiny_llama_dir), num_kv_blocks=24, block_size=4, max_model_len=64) as tight:
        got, preempted = _generate(tight, params)
    assert none == 0 and preempted > 0, "the small pool was meant to force preemption"
    assert got == expected
    tokenizer = load_tokenizer(resolve_source(str(tiny_llama_dir), tiny_llama_dir))
    for ids in got:
        jsonschema.validate(json.loads(tokenizer.decode([t for t in ids if t != EOS])), SCHEMA)
