"""Quantized weights against the dequantized bf16 model, teacher-forced over a fixed English
text (tests/data/quant_accuracy.txt, 328 tokens): perplexity and next-token top-1 agreement.

Bounds (issue 14): the default GGUF served packed (Q4_1 linears, Q8_0 embedding/head) within
0.5% perplexity of the same file dequantized to bf16; an HF checkpoint (the dequantized default
model) quantized at load to int8 per output channel within 1% of its bf16 run; int4 (groups of
32, scale + min) within 1% too. Measured with the torch reference: packed -0.04%, int8 -0.03%,
int4 -0.24%, top-1 agreement 0.96-0.98. int4 is near-lossless here only because these weights
already lie on a Q4_1 grid of groups of 32; the 1% bound is the one int8 gets, not a tighter one.
Those runs keep bf16 activations (the W8A8 kernel off). With it (issue 15: batched products
take int8 activations per token and int8 per-channel weights, the GGUF's requantized), both the
packed GGUF and HF int8 within 2% (issue 14's bound for int8 activations), top-1 >= 0.85:
measured packed +1.3%, HF int8 +0.7%, top-1 0.88-0.90 (per-token scales are coarser than
per-block ones; the LM head's top-16 rescoring keeps the chosen tokens' logits exact)."""

import math
import types

import pytest
import torch

quant = pytest.importorskip("gateway.kernels.quant")

from gateway.engine.llm import LLM                      # noqa: E402
from gateway.executor.batch import build_flat_batch     # noqa: E402

TEXT = (__import__("pathlib").Path(__file__).parent / "data" / "quant_accuracy.txt").read_text()


def teacher_forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prefill of `ids` (blocks 0..n of the runner's cache)."""
    runner = llm.core.runner
    seq = types.SimpleNamespace(num_computed_tokens=0, token_ids=ids, num_tokens=len(ids),
                                block_table=list(range(-(-len(ids) // runner.block_size))))
    batch = build_flat_batch([types.SimpleNamespace(seq=seq, num_new_tokens=len(ids))], runner.block_size,
                             runner.device)
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches)
        return runner.model.compute_logits(hidden).float()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return math.exp(-logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item())


@pytest.fixture(scope="module")
def runs(default_model_dir):
    """quantization mode → (logits, weight bytes by type); each model built and dropped in turn.
    `auto` serves a GGUF packed only with native kernels: the packed run forces it here, so the
    loading, merging and un-permuting are checked through the torch reference too."""
    out = {}
    native, quant.NATIVE_KERNELS = quant.NATIVE_KERNELS, True
    crossover = quant.GEMM_MIN_ROWS
    hf = str(default_model_dir)
    runs = [("bf16", None, "none", False), ("packed", None, "auto", False), ("int8", hf, "int8", False),
            ("int4", hf, "int4", False)]
    if quant.GEMM_KERNEL:   # the same weights with the W8A8 kernel's int8 activations per token
        runs += [("packed-a8", None, "auto", True), ("int8-a8", hf, "int8", True)]
    for name, model, mode, int8_activations in runs:
        quant.GEMM_MIN_ROWS = quant.GEMM_CROSSOVER if int8_activations else None   # the prefill is one batch of 328 rows
        llm = LLM(model, quantization=mode, dtype="bfloat16", num_kv_blocks=32, max_model_len=512)
        ids = llm.tokenizer.encode(TEXT)
        out[name] = (teacher_forced_logits(llm, ids), llm.core.runner.weight_bytes, ids)
        del llm
    quant.NATIVE_KERNELS, quant.GEMM_MIN_ROWS = native, crossover
    return out


def _compare(runs, name):
    base, _, ids = runs["bf16"]
    logits, sizes, _ = runs[name]
    ratio = perplexity(logits, ids) / perplexity(base, ids)
    agreement = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
    return ratio, agreement, sizes


def test_the_text_is_a_few_hundred_tokens(runs):
    assert 250 <= len(runs["bf16"][2]) <= 512


def test_native_q4_1_packed_is_within_half_a_percent_of_the_dequantized_path(runs):
    ratio, agreement, sizes = _compare(runs, "packed")
    assert abs(ratio - 1) < 0.005 and agreement >= 0.9
    assert set(sizes) >= {"q4_1", "q8_0"} and sizes.get("bf16", 0) < 2**20   # only the norms stay float


def test_hf_int8_is_within_one_percent_of_bf16(runs):
    ratio, agreement, sizes = _compare(runs, "int8")
    assert abs(ratio - 1) < 0.01 and agreement >= 0.9
    assert "int8" in sizes


def test_hf_int4_is_within_one_percent_of_bf16(runs):
    ratio, agreement, sizes = _compare(runs, "int4")
    assert abs(ratio - 1) < 0.01 and agreement >= 0.9
    assert "int4" in sizes


@pytest.mark.parametrize("name,qtype", [("packed-a8", "q4_1"), ("int8-a8", "int8")])
def test_int8_activations_are_within_two_percent(runs, name, qtype):
    if name not in runs:
        pytest.skip("no W8A8 kernel on this machine")
    ratio, agreement, sizes = _compare(runs, name)
    assert abs(ratio - 1) < 0.02 and agreement >= 0.85
    assert qtype in sizes
    assert not torch.equal(runs[name][0], runs[name.removesuffix("-a8")][0])   # the kernel did run
