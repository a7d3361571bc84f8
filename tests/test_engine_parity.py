"""Greedy decoding through our engine is token-exact against transformers' generate
(float32, same weights), for prompts batched together, and again under a KV pool so
small that chunked prefill and preemption both happen."""

from __future__ import annotations

import pytest
import torch

from gateway.engine.llm import LLM
from gateway.sampling.params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Hello",
    "Explain in one paragraph why the sky is blue, mentioning Rayleigh scattering and the wavelengths involved.",
    "Translate to French: good morning, how are you today?",
    "List three prime numbers:",
]
NEW_TOKENS = 12


def hf_greedy(model_dir, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():   # plain greedy with transformers' KV cache, never stopping at EOS
        for ids in prompt_ids:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(new_tokens - 1):
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
    return outs


def run_engine(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return [r.token_ids for r in llm.generate(prompt_ids, params)]


@pytest.fixture(scope="module")
def default_fp32(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=512, block_size=16)
    prompt_ids = [llm.encode(p) for p in PROMPTS]
    return llm, prompt_ids, hf_greedy(default_model_dir, prompt_ids, NEW_TOKENS)


@pytest.mark.slow
def test_batched_greedy_matches_transformers(default_fp32):
    llm, prompt_ids, expected = default_fp32
    assert sorted(len(p) for p in prompt_ids)[0] < sorted(len(p) for p in prompt_ids)[-1]
    assert run_engine(llm, prompt_ids) == expected


@pytest.mark.slow
def test_greedy_matches_under_chunked_prefill_and_preemption(default_fp32, default_model_dir):
    _, prompt_ids, expected = default_fp32
    # 12 blocks x 4 tokens cannot hold 8 sequences of ~10-25 tokens: forces preemption;
    # a 16-token budget forces the longer prompts to prefill in chunks.
    small = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=14, block_size=4,
                max_num_batched_tokens=16, max_num_seqs=8, max_model_len=48)
    stats = []
    original_step = small.core.step

    def recording_step():
        outputs, step_stats = original_step()
        stats.append(step_stats)
        return outputs, step_stats

    small.core.step = recording_step
    assert run_engine(small, prompt_ids) == expected
    assert sum(s.num_preemptions for s in stats) > 0, "the pool was meant to force preemption"
    assert max(len(p) for p in prompt_ids) > 16, "a prompt longer than the budget must be chunked"
    assert small.core.scheduler.num_free_blocks == small.core.scheduler.num_total_blocks


@pytest.mark.parametrize("architecture,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("mistral", {}),
    ("qwen2", {}),
])
def test_tiny_architectures_match_transformers(tiny_model, architecture, overrides):
    model_dir = tiny_model(architecture, shard=architecture == "mistral", **overrides)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, block_size=8)
    prompt_ids = [list(range(5, 5 + n)) for n in (3, 9, 17, 30)]
    assert run_engine(llm, prompt_ids) == hf_greedy(model_dir, prompt_ids, NEW_TOKENS)
