"""The CUDA-graph decode path (gateway/executor/cuda_graphs.py), tested without a GPU: bucket
sizes and choice, buffer loading and padding, the eager fallback, and the replay logic end to
end through an eager stand-in for the graph (same persistent buffers and metadata; "replay"
re-runs the forward into the captured output). torch.cuda.graph itself is not exercised here.

`check_replay_matches_eager` is shared with tests/test_triton_model.py, which runs it through
the Triton kernels under the interpreter (padded rows, fixed split-K count)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gateway.config import Config
from gateway.executor.batch import build_flat_batch
from gateway.executor.cuda_graphs import CudaGraphRunner, DecodeBuffers, capture_sizes, use_cuda_graphs
from gateway.sampling.params import SamplingParams
from gateway.scheduler.scheduler import ScheduledSequence
from gateway.scheduler.sequence import Sequence

CPU = torch.device("cpu")


class _EagerGraph:
    def __init__(self, forward):
        self.forward = forward
        self.output = forward()

    def replay(self) -> None:
        self.output.copy_(self.forward())


class EagerGraphRunner(CudaGraphRunner):
    """CudaGraphRunner whose "graphs" re-run the forward on the same buffers; `splits` fixes the
    decode split-K count (None: the real per-bucket choice, which imports the Triton kernels)."""

    def __init__(self, *args, splits: int | None = None):
        super().__init__(*args)
        self.splits = splits

    def _splits_for(self, bucket: int) -> int:
        return self.splits if self.splits is not None else super()._splits_for(bucket)

    def _record(self, bucket, meta):
        return _EagerGraph(lambda: self._forward(bucket, meta))


def make_step(specs, block_size: int) -> list[ScheduledSequence]:
    """specs: (context length after the step, new tokens, first block id); blocks consecutive."""
    step = []
    for i, (length, new, first_block) in enumerate(specs):
        blocks = list(range(first_block, first_block + -(-length // block_size)))
        seq = Sequence(f"s{i}", [(37 * i + 5 * t) % 1000 + 1 for t in range(length)],
                       SamplingParams(temperature=0), num_computed_tokens=length - new, block_table=blocks)
        step.append(ScheduledSequence(seq, new))
    return step


def decode_batch(lengths, block_size=16):
    specs, block = [], 0
    for length in lengths:
        specs.append((length, 1, block))
        block += -(-length // block_size)
    return build_flat_batch(make_step(specs, block_size), block_size, CPU)


def test_capture_sizes_are_powers_of_two_then_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_graphs_only_on_cuda_with_triton_kernels_and_not_enforce_eager():
    cuda = torch.device("cuda")
    assert use_cuda_graphs(Config(), cuda)
    assert use_cuda_graphs(Config(kernel_backend="triton"), cuda)
    assert not use_cuda_graphs(Config(enforce_eager=True), cuda)
    assert not use_cuda_graphs(Config(kernel_backend="torch"), cuda)     # references read host lists
    assert not use_cuda_graphs(Config(tensor_parallel_size=2), cuda)
    assert not use_cuda_graphs(Config(kernel_backend="triton"), CPU)


def test_bucket_choice_and_eager_fallback():
    graphs = CudaGraphRunner(None, [], 48, 64, 16, CPU)              # 64 tokens: 4 table columns
    assert graphs.bucket_for(decode_batch([5])) is None               # nothing captured yet
    graphs.graphs = {size: None for size in graphs.sizes}
    for n, bucket in [(1, 1), (3, 4), (4, 4), (17, 32), (33, 48), (48, 48), (49, None)]:
        assert graphs.bucket_for(decode_batch([20] * n)) == bucket, n
    mixed = build_flat_batch(make_step([(20, 1, 0), (9, 9, 2)], 16), 16, CPU)
    assert mixed.meta.num_decodes == 1 and graphs.bucket_for(mixed) is None
    one_token_chunk = build_flat_batch(make_step([(30, 1, 0)], 16), 16, CPU)   # one query: a decode
    assert graphs.bucket_for(one_token_chunk) == 1
    assert graphs.bucket_for(decode_batch([64, 3])) == 2
    assert graphs.bucket_for(decode_batch([65, 3])) is None           # wider than the buffers


def test_load_copies_the_rows_and_repads_the_rest_of_the_bucket():
    buffers = DecodeBuffers(8, 4, CPU)
    buffers.load(decode_batch([40, 50, 60, 61, 62, 63]), 8)           # a larger, wider step first
    batch = decode_batch([5, 17, 20])
    buffers.load(batch, 4)
    meta = buffers.meta(4, 64, 3)
    assert torch.equal(meta.slot_mapping[:3], batch.meta.slot_mapping)
    assert torch.equal(buffers.input_ids[:3], batch.input_ids)
    assert torch.equal(buffers.positions[:3], batch.positions)
    assert meta.seq_lens.tolist() == [5, 17, 20, 1]
    assert meta.block_tables.tolist() == [[0, 0, 0, 0], [1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]]
    assert meta.slot_mapping[3] == -1 and buffers.input_ids[3] == 0 and buffers.positions[3] == 0
    # The metadata are views of the persistent buffers: a graph captured on them sees each load.
    assert meta.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()
    assert meta.block_tables.data_ptr() == buffers.block_tables.data_ptr()
    assert (meta.num_decodes, meta.num_seqs, meta.max_query_len, meta.decode_splits) == (4, 4, 1, 3)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def _clone(caches):
    return [(k.clone(), v.clone()) for k, v in caches]


def check_replay_matches_eager(runner, splits: int | None, atol: float) -> None:
    """Prefill five sequences, then decode them through a bucket of 8 (three padded rows):
    capture writes nothing, the replayed hidden states and KV writes match eager ones, and
    no slot other than the five decode slots changes."""
    bs = runner.block_size
    prefill = make_step([(3, 3, 0), (9, 9, 1), (17, 17, 4), (6, 6, 9), (13, 13, 11)], bs)
    with torch.inference_mode():
        pre = build_flat_batch(prefill, bs, runner.device)
        runner.model(pre.input_ids, pre.positions, pre.meta, runner.kv_caches)
    batch = build_flat_batch(make_step([(4, 1, 0), (10, 1, 1), (18, 1, 4), (7, 1, 9), (14, 1, 11)], bs),
                             bs, runner.device)
    graphs = EagerGraphRunner(runner.model, runner.kv_caches, 8, 64, bs, runner.device, splits=splits)
    before = _clone(runner.kv_caches)
    graphs.capture()
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(runner.kv_caches, before))
    assert graphs.bucket_for(batch) == 8
    replayed = graphs.run(batch).clone()
    after_replay = _clone(runner.kv_caches)
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        k.copy_(k0), v.copy_(v0)
    with torch.inference_mode():
        eager = runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches)
    torch.testing.assert_close(replayed, eager, atol=atol, rtol=atol)
    written = torch.zeros(runner.num_blocks * bs, dtype=torch.bool)
    written[batch.meta.slot_mapping] = True
    for (k, v), (k_r, v_r), (k0, v0) in zip(runner.kv_caches, after_replay, before):
        for cache, replay, old in ((k, k_r, k0), (v, v_r, v0)):
            flat, flat_replay, flat_old = (c.flatten(0, 1) for c in (cache, replay, old))
            assert torch.equal(flat_replay[~written], flat_old[~written])
            torch.testing.assert_close(flat_replay[written], flat[written], atol=atol, rtol=atol)


@pytest.fixture
def cpu_runner(tiny_model):
    from gateway import kernels
    from gateway.executor.model_runner import ModelRunner
    from gateway.models.loader import load_hf_config, resolve_source
    model_dir = tiny_model()
    config = Config(model=str(model_dir), dtype="float32", device="cpu", num_kv_blocks=32, block_size=4,
                    max_num_seqs=8)
    source = resolve_source(str(model_dir), Path("~/.cache/gateway").expanduser())
    runner = ModelRunner(config, source, load_hf_config(source), set())
    kernels.set_backend("torch")
    yield runner
    kernels.set_backend("auto")


def test_cpu_runner_has_no_graphs_and_replay_logic_matches_eager(cpu_runner):
    assert cpu_runner.cuda_graphs is None
    check_replay_matches_eager(cpu_runner, splits=3, atol=1e-5)


def test_execute_replays_decode_steps_and_runs_other_steps_eagerly(cpu_runner):
    prefill = make_step([(5, 5, 0), (11, 11, 2), (7, 7, 5)], 4)
    decode = make_step([(6, 1, 0), (12, 1, 2), (8, 1, 5)], 4)
    first = cpu_runner.execute(prefill).token_ids
    before = _clone(cpu_runner.kv_caches)
    eager = cpu_runner.execute(decode).token_ids
    for (k, v), (k0, v0) in zip(cpu_runner.kv_caches, before):
        k.copy_(k0), v.copy_(v0)
    graphs = EagerGraphRunner(cpu_runner.model, cpu_runner.kv_caches, 8, 64, 4, CPU, splits=2)
    graphs.capture()
    replays = []

    def recording_run(batch, run=graphs.run):
        replays.append(run(batch))
        return replays[-1]

    graphs.run = recording_run
    cpu_runner.cuda_graphs = graphs
    assert cpu_runner.execute(decode).token_ids == eager
    assert replays[-1] is not None and replays[-1].shape[0] == 3
    assert cpu_runner.execute(prefill).token_ids == first               # not decode-only: eager
    assert replays[-1] is None and len(replays) == 2
