"""The cost of constrained decoding: ms per decode step with and without a json_schema on every
sequence, at each batch size, through the real engine; and the sampler alone (mask fill +
apply + sampling on random logits), which is all the grammar adds to a step.

    python bench/grammar.py                       # default model, batches 1 and 16
    python bench/grammar.py --model /path/to/tiny --batches 1 16 64 --steps 32

The schema is a string of exactly --chars characters, so no sequence ends before the timed
steps do (the batch stays full) and the grammar is live on every step.
"""

from __future__ import annotations

import argparse
import time

import torch


def engine_step_ms(llm, batch: int, steps: int, schema: dict | None) -> float:
    """Mean wall ms of `steps` decode steps with `batch` sequences running (prefill excluded)."""
    from gateway.sampling.params import SamplingParams
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=schema is None, json_schema=schema)
    ids = [llm._submit([5 + i, 6, 7, 8, 9, 10], params, chat=False) for i in range(batch)]
    core = llm.core
    while any(core.requests[r].seq.num_output_tokens == 0 for r in ids):   # prefill steps
        core.step()
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
        assert core.scheduler.num_running == batch, "a sequence ended early: raise --chars"
    elapsed = time.perf_counter() - start
    for r in ids:
        core.abort(r)
    return 1000 * elapsed / steps


def sampler_ms(grammars, batch: int, steps: int, schema: dict | None, vocab: int) -> float:
    """Mean ms of SamplingBatch.build + Sampler on random [batch, vocab] logits (top-p 0.9)."""
    from gateway.sampling.batch import SamplingBatch
    from gateway.sampling.params import SamplingParams
    from gateway.sampling.sampler import Sampler
    from gateway.scheduler.sequence import Sequence
    params = SamplingParams(temperature=1.0, top_p=0.9, json_schema=schema)
    seqs = [Sequence(f"r{i}", [1, 2, 3], params) for i in range(batch)]
    sampler, total = Sampler(), 0.0
    for step in range(steps + 2):
        for seq in seqs:
            if schema is not None and (seq.grammar is None or seq.grammar.is_stopped):
                seq.grammar, seq.token_ids[3:] = grammars.new_state(params.grammar_key), []
        logits = torch.randn(batch, vocab) * 3
        start = time.perf_counter()
        out = sampler(logits, SamplingBatch.build(seqs, vocab, {2}, "cpu"))
        if step >= 2:   # the first two warm the caches
            total += time.perf_counter() - start
        for seq, token in zip(seqs, out.token_ids):
            if seq.grammar is not None:
                seq.grammar.advance(token)
            seq.append_token(token)
    return 1000 * total / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--chars", type=int, default=400)
    args = ap.parse_args()
    from gateway.engine.llm import LLM
    schema = {"type": "string", "minLength": args.chars, "maxLength": args.chars}
    llm = LLM(args.model, max_model_len=1024, max_num_seqs=max(args.batches))
    llm.core.grammars.new_state(("json_schema", '{"type":"object"}'))   # waits for the tokenizer build
    vocab = llm.core.runner.arch.vocab_size
    print(f"{'batch':>5} {'step ms':>9} {'+schema':>9} {'cost':>7} | {'sampler ms':>10} {'+schema':>9}")
    for batch in args.batches:
        engine_step_ms(llm, batch, 4, schema)   # warm-up (graphs, caches, this grammar's template)
        plain, constrained = (engine_step_ms(llm, batch, args.steps, s) for s in (None, schema))
        s_plain, s_con = (sampler_ms(llm.core.grammars, batch, args.steps, s, vocab) for s in (None, schema))
        print(f"{batch:>5} {plain:>9.2f} {constrained:>9.2f} {100 * (constrained / plain - 1):>6.1f}% | "
              f"{s_plain:>10.2f} {s_con:>9.2f}")


if __name__ == "__main__":
    main()
