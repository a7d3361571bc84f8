"""CUDA graphs for pure-decode steps: one captured model forward per batch-size bucket.

Owns the bucket sizes (1, 2, 4, ... up to max_num_seqs), the persistent decode input buffers
every graph reads, and the graphs with their output tensors. CPU never uses any of it, nor
does CUDA under --enforce-eager, the torch kernel backend (the references read host lists
and synchronise, which a graph cannot hold) or tensor parallelism; see `use_cuda_graphs`.

Capture, once at start-up after the KV cache exists, largest bucket first into one shared
memory pool, per bucket: reset the buffers to padding → warm-up forwards on a side stream
(Triton compiles, the allocator settles) → capture `model(...)` under torch.cuda.graph.
The decode kernel's split-K count is fixed per bucket at that point (decode_splits in the
metadata): the host-side choice reads seq_lens_cpu, which a replay never sees; any fixed
count is correct, since each sequence divides its own device-side length among the splits.

Replay, for a step whose sequences all have one query token and fit a bucket: copy the
batch's rows into the buffers, overwrite the remaining rows of the bucket with padding
(slot -1: no KV write; seq_len 1 over block 0: a harmless read), replay, and return the
first rows of the graph's output — valid until the next replay. Anything else runs eagerly.
The graphs hold the KV cache tensors they were captured with: replacing them needs a re-capture.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gateway.kernels.metadata import AttentionMetadata

log = logging.getLogger("gateway.cuda_graphs")

WARMUP_RUNS = 2


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: [1, 2, 4, ..., max]."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    return sizes + [max_num_seqs]


def use_cuda_graphs(config, device: torch.device) -> bool:
    # Tensor parallelism stays eager: capturing NCCL collectives is untested here.
    return (device.type == "cuda" and not config.enforce_eager and config.kernel_backend != "torch"
            and config.tensor_parallel_size == 1)


class DecodeBuffers:
    """Persistent inputs for up to `max_batch` decode rows; graphs capture views of them."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device):
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=device)
        self.positions = torch.zeros(max_batch, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def meta(self, bucket: int, max_context: int, decode_splits: int | None) -> AttentionMetadata:
        """Metadata over the first `bucket` rows. The host lists only carry the shapes: a
        replay never reads them (the torch references would, hence no graphs with them)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
            seq_lens=self.seq_lens[:bucket], block_tables=self.block_tables[:bucket],
            max_query_len=1, max_seq_len=max_context, num_decodes=bucket,
            query_start_loc_cpu=list(range(bucket + 1)), seq_lens_cpu=[max_context] * bucket,
            decode_splits=decode_splits)

    def pad(self, start: int, stop: int) -> None:
        """Rows [start, stop) become padding that neither writes the cache nor reads garbage."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = -1
        self.seq_lens[start:stop] = 1
        self.block_tables[start:stop] = 0

    def load(self, batch, bucket: int) -> None:
        """Rows [0, n) from `batch` (a decode-only FlatBatch), rows [n, bucket) padding. Every
        row of the bucket is rewritten: stale rows of an earlier, larger step hold live slots."""
        meta = batch.meta
        n, width = meta.num_seqs, meta.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, width:] = 0
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.pad(n, bucket)


@dataclass
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor          # [bucket, hidden], rewritten by every replay

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_context: int, block_size: int, device: torch.device):
        self.model, self.kv_caches, self.max_context = model, kv_caches, max_context
        self.sizes = capture_sizes(max_num_seqs)
        self.buffers = DecodeBuffers(self.sizes[-1], -(-max_context // block_size), device)
        self.graphs: dict[int, CapturedGraph] = {}
        self._pool = None

    def bucket_for(self, batch) -> int | None:
        """The smallest captured bucket that holds this step, or None: run it eagerly."""
        meta = batch.meta
        if meta.num_decodes != meta.num_seqs or meta.block_tables.shape[1] > self.buffers.max_blocks:
            return None
        return next((s for s in self.sizes if s >= meta.num_seqs and s in self.graphs), None)

    @torch.inference_mode()
    def run(self, batch) -> torch.Tensor | None:
        """Hidden states [n, hidden] for a decode-only batch through its graph, else None."""
        bucket = self.bucket_for(batch)
        if bucket is None:
            return None
        self.buffers.load(batch, bucket)
        captured = self.graphs[bucket]
        captured.replay()
        return captured.output[:batch.meta.num_seqs]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (later, smaller graphs reuse its pool)."""
        start = time.perf_counter()
        for bucket in reversed(self.sizes):
            self.buffers.pad(0, bucket)
            meta = self.buffers.meta(bucket, self.max_context, self._splits_for(bucket))
            self.graphs[bucket] = self._record(bucket, meta)
        log.info("captured %d CUDA graphs for decode batches of %s sequences in %.1f s",
                 len(self.graphs), self.sizes, time.perf_counter() - start)

    def _splits_for(self, bucket: int) -> int:
        """Split-K count sized for the longest context the bucket may ever see."""
        from gateway.kernels.triton_attention import choose_num_splits   # imports triton
        return choose_num_splits(bucket, self.kv_caches[0][0].shape[2], self.max_context)

    def _forward(self, bucket: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(self.buffers.input_ids[:bucket], self.buffers.positions[:bucket], meta,
                          self.kv_caches)

    def _record(self, bucket: int, meta: AttentionMetadata) -> CapturedGraph:
        """Warm up on a side stream (compiles Triton, settles the allocator), then capture."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward(bucket, meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._forward(bucket, meta)
        return CapturedGraph(graph, output)


def build_cuda_graphs(config, device: torch.device, model, kv_caches, max_position: int,
                      num_blocks: int, block_size: int) -> CudaGraphRunner | None:
    """The runner's entry point: captured decode graphs, or None where they do not apply."""
    if not use_cuda_graphs(config, device):
        return None
    max_context = min(max_position, config.max_model_len or max_position, num_blocks * block_size)
    graphs = CudaGraphRunner(model, kv_caches, config.max_num_seqs, max_context, block_size, device)
    graphs.capture()
    return graphs
