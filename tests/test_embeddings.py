"""Embeddings in the engine (LLM.embed): prefill-only sequences pooled from the final hidden
states match transformers' own last_hidden_state (last token and mean, chunked prefill
included), are L2-normalized, are never decoded, and give every KV block back."""

from __future__ import annotations

import pytest
import torch
import transformers

from gateway import LLM, SamplingParams

TEXTS = ["hello world", "a much longer sentence " * 8, "x"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    # 32-token steps: the 33-token input is prefilled in two chunks
    with LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, max_model_len=256,
             max_num_batched_tokens=32, max_num_seqs=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return transformers.AutoModel.from_pretrained(str(tiny_llama_dir), torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vectors_match_transformers_hidden_states(llm, reference, pooling):
    got = llm.embed(TEXTS, pooling=pooling)
    for text, vector in zip(TEXTS, got):
        ids = llm.tokenizer.encode(text)
        with torch.no_grad():
            hidden = reference(torch.tensor([ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden[-1] if pooling == "last" else hidden.mean(0), dim=0)
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-5), (pooling, len(ids))
    assert llm.core.scheduler.num_free_blocks == llm.core.scheduler.num_total_blocks
    assert not llm.core.requests


def test_embeddings_share_steps_with_generation_and_are_never_decoded(llm):
    decoded = []
    update = llm.core.scheduler.update

    def watch(plan, tokens):
        decoded.extend(row.seq.request_id for row in plan.scheduled if row.seq.pooling and row.is_decode)
        assert all(t is None for row, t in zip(plan.scheduled, tokens) if row.seq.pooling)
        update(plan, tokens)
    llm.core.scheduler.update = watch
    try:
        params = SamplingParams(max_tokens=6, temperature=0)
        alone = llm.generate(["The sky is"], params)[0].token_ids
        llm._submit("The sky is", params, False)
        vectors = llm.embed(TEXTS)   # steps shared with the generation still running
        while llm.core.has_work:
            llm.core.step()
    finally:
        llm.core.scheduler.update = update
    assert decoded == [] and len(vectors) == 3
    assert torch.allclose(torch.tensor(vectors), torch.tensor(llm.embed(TEXTS)), atol=1e-5)
    assert llm.generate(["The sky is"], params)[0].token_ids == alone
    assert llm.core.scheduler.num_free_blocks == llm.core.scheduler.num_total_blocks
