"""End to end: a tiny random-weight Llama gives the same logits, and the same greedy tokens,
through the Triton kernels (interpreted on CPU) as through the torch references.

The Triton half runs in a subprocess (this file, run as a script) with TRITON_INTERPRET=1:
whether kernels run interpreted is fixed when triton and gateway.kernels.triton_* are first
imported, and tests/test_kernels.py needs to be first. So this process never imports triton,
and any order of test collection works.

The logits batch is a real mixed step built by build_flat_batch: two decodes, a prefill
chunk whose first 24 tokens are already cached (written by the previous step), and a
prefix-cache hit that reuses another sequence's first block. Both backends fill their own
KV caches, so store_kv is compared too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not importorskip: importing triton here, before tests/test_kernels.py sets TRITON_INTERPRET,
# would decorate triton.language's own helpers for compilation and break that module's tests.
if importlib.util.find_spec("triton") is None or importlib.util.find_spec("numpy") is None:
    pytest.skip("needs triton and numpy", allow_module_level=True)

pytestmark = pytest.mark.triton

# head_dim must be 64 or 128 for the kernels: 2 query heads of 64 over 1 kv head (GQA 2:1).
TINY = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
            num_hidden_layers=2)
BLOCK_SIZE = 16
DTYPES = ("float32", "bfloat16")
# Same weights and inputs, different kernels; the logits have std ~0.23. fp32: kernels and
# references differ only in summation order (measured max |diff| 5e-7). bf16: the attention
# reference rounds scores and probabilities to bf16 where the kernels keep fp32 (measured max
# |diff| 1.2e-2). For scale: losing ONE cached token of a 40-token prefix moves every affected
# row's logits by 0.08-0.13, in both dtypes, so the bf16 bound still catches a wrong lookup.
TOLERANCE = {"float32": dict(atol=1e-5, rtol=1e-5), "bfloat16": dict(atol=3e-2, rtol=2e-2)}
GREEDY_PROMPTS = [list(range(100, 105)), list(range(300, 320)), list(range(1000, 1037))]
GREEDY_TOKENS = 4


# ---- worker (runs in the subprocess) ------------------------------------------------------
def _scheduled(seq, num_new_tokens):
    from gateway.scheduler.scheduler import ScheduledSequence
    return ScheduledSequence(seq, num_new_tokens)


def _two_steps():
    """[step1, step2], each a list of (request id, token ids, computed, blocks, new tokens).
    Step 1 prefills B and C whole and A's first 24 tokens; step 2 is the mixed batch."""
    a = [(7 * i + 11) % 4000 for i in range(40)]
    b, c = list(range(500, 509)), [(13 * i + 5) % 4000 for i in range(33)]
    d = a[:16] + [42, 43, 44, 45, 46, 47, 48]          # shares A's first (full) block
    step1 = [("A", a, 0, [3, 7, 1], 24), ("B", b, 0, [0], 9), ("C", c, 0, [5, 2, 9], 33)]
    step2 = [("A", a, 24, [3, 7, 1], 16), ("B", b + [77], 9, [0], 1),
             ("C", c + [88], 33, [5, 2, 9], 1), ("D", d, 16, [3, 11], 7)]
    return [step1, step2]


def _step_logits(runner, step) -> "torch.Tensor":
    import torch
    from gateway.executor.batch import build_flat_batch
    from gateway.scheduler.sequence import Sequence
    scheduled = []
    for rid, tokens, computed, blocks, new in step:
        seq = Sequence(rid, list(tokens), num_computed_tokens=computed, block_table=list(blocks))
        scheduled.append(_scheduled(seq, new))
    order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens > 1)  # the scheduler's
    batch = build_flat_batch([scheduled[i] for i in order], runner.block_size, runner.device)
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches)
        logits = runner.model.compute_logits(hidden)
    # Undo the decodes-first order so rows line up with `step`.
    return torch.cat([logits[batch.meta.query_start_loc_cpu[r]:batch.meta.query_start_loc_cpu[r + 1]]
                      for r in sorted(range(len(order)), key=order.__getitem__)])


def _runner(model_dir: str, dtype: str):
    from gateway.config import Config
    from gateway.executor.model_runner import ModelRunner
    from gateway.models.loader import load_hf_config, resolve_source
    source = resolve_source(model_dir, Path("~/.cache/gateway").expanduser())
    config = Config(model=model_dir, dtype=dtype, device="cpu", num_kv_blocks=16, block_size=BLOCK_SIZE)
    return ModelRunner(config, source, load_hf_config(source), set())


def worker_logits(model_dir: str, out: str) -> None:
    import torch
    from gateway import kernels
    results = {}
    for dtype in DTYPES:
        runner = _runner(model_dir, dtype)
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            runner.kv_caches = runner._allocate_kv_cache(runner.num_blocks)
            results[f"{dtype}/{backend}"] = [_step_logits(runner, step) for step in _two_steps()]
    torch.save(results, out)


def worker_graphs(model_dir: str, out: str) -> None:
    """The CUDA-graph replay logic (eager stand-in) through the Triton kernels: padded rows
    and a forced split-K count, then the per-bucket count capture would pick."""
    from gateway import kernels
    from test_cuda_graphs import check_replay_matches_eager
    runner = _runner(model_dir, "float32")
    kernels.set_backend("triton")
    for splits in (4, None):
        runner.kv_caches = runner._allocate_kv_cache(runner.num_blocks)
        check_replay_matches_eager(runner, splits, atol=1e-5)
    Path(out).write_text("ok")


def worker_greedy(model_dir: str, out: str) -> None:
    from gateway.engine.llm import LLM
    from gateway.sampling.params import SamplingParams
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        # A 16-token budget chunks the longer prompts, so steps mix decodes with prefill chunks.
        llm = LLM(model_dir, dtype="float32", kernel_backend=backend, num_kv_blocks=32,
                  block_size=BLOCK_SIZE, max_num_batched_tokens=16, max_num_seqs=4)
        tokens[backend] = [r.token_ids for r in llm.generate(GREEDY_PROMPTS, params)]
    Path(out).write_text(json.dumps(tokens))


# ---- tests (run in pytest's process) ------------------------------------------------------
def run_worker(mode: str, model_dir: Path, out: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, mode, str(model_dir), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    from conftest import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), default_model_dir, **TINY)


def test_triton_logits_match_torch_on_a_mixed_batch(tiny_dir, tmp_path):
    import torch
    run_worker("logits", tiny_dir, tmp_path / "logits.pt")
    results = torch.load(tmp_path / "logits.pt")
    for dtype in DTYPES:
        expected_steps, got_steps = results[f"{dtype}/torch"], results[f"{dtype}/triton"]
        for step, (expected, got) in enumerate(zip(expected_steps, got_steps)):
            assert got.shape == expected.shape == (sum(s[4] for s in _two_steps()[step]), 49152)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, expected, **TOLERANCE[dtype], msg=lambda m: f"{dtype} step {step}: {m}")
        # The comparison is not vacuous: the batch's rows really differ from one another.
        assert expected_steps[1].std(dim=0).mean() > 0.05


def test_graph_replay_logic_through_triton_kernels_matches_eager(tiny_dir, tmp_path):
    run_worker("graphs", tiny_dir, tmp_path / "graphs.txt")
    assert (tmp_path / "graphs.txt").read_text() == "ok"


def test_triton_greedy_tokens_match_torch_through_the_llm_api(tiny_dir, tmp_path):
    run_worker("greedy", tiny_dir, tmp_path / "greedy.json")
    tokens = json.loads((tmp_path / "greedy.json").read_text())
    assert [len(t) for t in tokens["torch"]] == [GREEDY_TOKENS] * len(GREEDY_PROMPTS)
    assert tokens["triton"] == tokens["torch"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    workers = {"logits": worker_logits, "graphs": worker_graphs, "greedy": worker_greedy}
    workers[sys.argv[1]](sys.argv[2], sys.argv[3])
