"""Pipeline parallelism (`--pp N`) and multi-host ranks: how layers split into stages, that
each stage holds only its own layers, greedy parity with --pp 1 in float32 (tiny model,
in-process: --pp 2, and --tp 2 --pp 2 once), and through `gateway serve` + `gateway worker`
as two separately started process trees on 127.0.0.1: the OpenAI client's answers, a killed
follower (503 within 2 s, the leader exits non-zero) and a follower that never comes (a
start-up error naming the missing rank after --dist-timeout)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from conftest import make_tiny_model
from gateway.executor.rendezvous import Layout
from gateway.models.partition import split_layers
from gateway.sampling.params import SamplingParams
from test_tensor_parallel import _ready_fails


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


def test_a_step_splits_into_two_micro_batches_of_about_equal_tokens_and_merges_back_in_order():
    from types import SimpleNamespace

    from gateway.executor.interface import StepResult
    from gateway.executor.stage_runner import merge_results, split_rows
    rows = [SimpleNamespace(num_new_tokens=n) for n in (1, 1, 1, 1, 8, 4)]   # decodes first
    first, second = split_rows(rows)
    assert [r.num_new_tokens for r in first] == [1, 1, 1, 1, 8] and [r.num_new_tokens for r in second] == [4]
    assert split_rows(rows[:1]) == [rows[:1]]
    assert [len(p) for p in split_rows([SimpleNamespace(num_new_tokens=1)] * 32)] == [16, 16]
    merged = merge_results([StepResult([5, None], None, {1: "bad"}), StepResult([7], ["lp"], {0: "worse"})], [2, 1])
    assert merged.token_ids == [5, None, 7] and merged.logprobs == [None, None, "lp"]
    assert merged.errors == {1: "bad", 2: "worse"}


def test_torchrun_variables_name_the_node_under_one_process_per_node():
    from gateway.config import Config
    from gateway.executor.node_agent import _torchrun_defaults
    config = _torchrun_defaults(Config(master_port=29500), {"LOCAL_RANK": "0", "WORLD_SIZE": "3", "RANK": "2"})
    assert (config.nnodes, config.node_rank) == (3, 2)
    assert _torchrun_defaults(Config(), {}) == Config()
    with pytest.raises(ValueError, match="--nproc-per-node 1"):
        _torchrun_defaults(Config(master_port=29500), {"LOCAL_RANK": "1", "WORLD_SIZE": "4", "RANK": "1"})


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


@pytest.mark.parametrize("tp_comm", ["shm", "gloo"])   # gloo: the subgroups tensor ranks on two hosts use
def test_tp2_pp2_greedy_tokens_equal_pp1(tiny_pp_model, tp_comm):
    expected, _, _ = _greedy(tiny_pp_model)
    got, _, pids = _greedy(tiny_pp_model, pipeline_parallel_size=2, tensor_parallel_size=2, tp_comm=tp_comm)
    assert got == expected
    assert len(pids) == 3 and mp.active_children() == []


# ---- two "hosts": `gateway serve --nnodes 2` and `gateway worker --node-rank 1` -------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(master_port: int, *extra: str):
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--nnodes", "2", "--node-rank", "1",
                             "--master-addr", "127.0.0.1", "--master-port", str(master_port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)    # its own process tree, as on another host
    return proc, log


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


CHAT = ["Name three colors.", "What is the capital of France?", "What is 12 times 7?"]


SERVE = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "64", "--log-level", "warning"]


def _chat_answers(url: str) -> list[str]:
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=16,
                                           temperature=0).choices[0].message.content for p in CHAT]


@pytest.mark.slow
def test_two_hosts_serve_the_default_model_and_a_killed_follower_gives_503s():
    from server_process import ServerProcess
    with ServerProcess(SERVE, start_timeout_s=300) as reference:
        expected = _chat_answers(reference.url)
    port = _free_port()
    worker, _ = _start_worker(port)                # before the leader: it waits for the store
    server = ServerProcess(["--pp", "2", "--nnodes", "2", "--node-rank", "0", "--master-port", str(port),
                            "--dist-timeout", "240", *SERVE], stop_timeout_s=30)
    try:
        server.wait_ready(300)
        assert _chat_answers(server.url) == expected and all(expected)
        status = {}
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
        sender = threading.Thread(target=lambda: status.update(
            code=httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code))
        sender.start()
        while httpx.get(server.url + "/ready", timeout=5).json()["kv_blocks_in_use"] == 0:
            assert sender.is_alive(), f"the request ended before the kill: {status}"
        _stop(worker)                              # the whole follower tree, SIGKILL
        killed = time.monotonic()
        sender.join(10)
        assert status.get("code") == 503 and time.monotonic() - killed < 2, status   # the in-flight request
        assert _ready_fails(server.url, time.monotonic() + 2)
        server.proc.wait(30)
        assert server.proc.returncode not in (0, None), server.tail()
    finally:
        server.stop()
        _stop(worker)


@pytest.mark.slow
def test_a_missing_follower_is_named_after_the_timeout(tiny_pp_model):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", str(tiny_pp_model), "--pp", "2",
                             "--nnodes", "2", "--master-port", str(_free_port()), "--port", str(_free_port()),
                             "--dist-timeout", "3", "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "rank(s) [1] did not join within 3s" in result.stderr
    assert "gateway worker --nnodes 2 --node-rank 1" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_follower_started_alone_gives_up_after_its_timeout():
    proc, log = _start_worker(_free_port(), "--dist-timeout", "2")
    try:
        assert proc.wait(60) == 1
        log.seek(0)
        assert "cannot reach the leader's rendezvous store at 127.0.0.1" in log.read()
    finally:
        _stop(proc)

