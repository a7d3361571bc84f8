"""ModelRunner: owns the model weights, the paged KV cache and the sampler on one device.

Start-up order: device and dtype (placement.py; the executor passes them in) → build the
model on the device → load weights (progress bar; models/weight_loading.py: GGUF packed or
dequantized, int8/int4 quantized, bytes by type logged) → prepack CPU linears → size and allocate
the KV cache (logged) → on CUDA, capture decode CUDA graphs (cuda_graphs.py). Each step: flat batch → one forward for all sequences
(a graph replay when every sequence decodes) → logits of the sampled rows → sampler.
As one tensor-parallel rank (a ParallelContext): the model is built as this rank's shard
and loaded from lazy checkpoint slices, and the KV cache waits for `init_kv_cache(n)`
with the block count the executor agreed on (the minimum over ranks); logits come back
gathered on rank 0, which samples, and as None elsewhere (StepResult of Nones).
As one pipeline stage (a LayerStage; executor/stage_runner.py runs its steps) it builds,
loads lazily and caches only that stage's layers, without CUDA graphs."""

from __future__ import annotations

import logging
import math
import mmap

import torch

from gateway import kernels
from gateway.config import Config
from gateway.executor.batch import build_flat_batch
from gateway.executor.cuda_graphs import build_cuda_graphs
from gateway.executor.interface import PooledChunk, StepResult
from gateway.executor.placement import Placement, resolve_placement
from gateway.models import registry
from gateway.models.loader import ModelSource
from gateway.models.partition import LayerStage
from gateway.models.tp_layers import ParallelContext, shard_plan
from gateway.models.weight_loading import load_model_weights
from gateway.sampling.sampler import Sampler, SamplingBatch

log = logging.getLogger("gateway.runner")

DEFAULT_CPU_KV_BYTES = 2 * 2**30


def huge_page_zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeroed host memory, advised for transparent huge pages (where the kernel has them in
    `madvise` mode, as ours does). Decode attention reads scattered 6 KB blocks of the KV
    cache: with 4 KB pages each block costs TLB misses, ~10% of a cold batch-64 call."""
    region = mmap.mmap(-1, max(1, numel * dtype.itemsize))   # anonymous: page-aligned, zero-filled
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):   # no THP on this system: ordinary pages
        pass
    tensor = torch.frombuffer(region, dtype=dtype, count=numel)   # keeps the region alive
    tensor.zero_()   # commit the memory now, as torch.zeros did, rather than on first use
    return tensor


class ModelRunner:
    """The Executor (interface.py) at tp=1, and each rank's model under tensor parallelism."""
    death_listener = None   # never called: nothing here dies apart from the engine thread itself

    def __init__(self, config: Config, source: ModelSource, hf_config, eos_token_ids: set[int],
                 parallel: ParallelContext | None = None, placement: Placement | None = None,
                 stage: LayerStage | None = None):
        self.config, self.parallel, self.stage = config, parallel, stage
        placement = placement or resolve_placement(config, hf_config)
        self.device, self.dtype = placement.device, placement.dtype
        kernels.set_backend(config.kernel_backend)
        model_class, self.arch = registry.resolve(hf_config)
        self.num_kv_heads = (self.arch.num_kv_heads if parallel is None else    # on this rank
                             shard_plan(self.arch, parallel.rank, parallel.world_size).attention.num_kv_heads)
        self.num_layers = self.arch.num_layers if stage is None else stage.count   # on this rank
        self.model = self._load_model(model_class, source)
        self.block_size = config.block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.num_blocks, self.kv_caches, self.cuda_graphs = 0, [], None
        if parallel is None and stage is None:   # other ranks wait for the count agreed over all ranks
            self.init_kv_cache(self.decide_num_blocks())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self._allocate_kv_cache(num_blocks)
        if self.stage is None:   # a pipeline stage's forward takes the previous stage's tensor: eager
            self.cuda_graphs = build_cuda_graphs(self.config, self.device, self.model, self.kv_caches,
                                                 self.arch.max_position_embeddings, self.num_blocks,
                                                 self.block_size)

    def _load_model(self, model_class, source: ModelSource):
        with torch.device(self.device):
            if self.stage is not None:
                if not getattr(model_class, "supports_pipeline_parallel", False):
                    raise ValueError(f"{self.arch.architecture} ({model_class.__name__}) does not support "
                                     f"pipeline parallelism; use --pp 1")
                model = model_class(self.arch, parallel=self.parallel, stage=self.stage)
            elif self.parallel is None:
                model = model_class(self.arch)
            elif getattr(model_class, "supports_tensor_parallel", False):
                model = model_class(self.arch, parallel=self.parallel)
            else:
                raise ValueError(f"{self.arch.architecture} ({model_class.__name__}) does not support "
                                 f"tensor parallelism; use --tp 1")
        model.to(self.dtype)
        first_rank = self.parallel is None or self.parallel.rank == 0     # one progress bar, not N
        split = self.parallel is not None or self.stage is not None       # read only this rank's slices
        self.weight_bytes = load_model_weights(model, source, self.dtype, self.device, self.config.quantization,
                                               lazy=split, progress=first_rank and self.stage is None)
        model.eval()
        if self.device.type == "cpu" and hasattr(model, "prepack"):
            model.prepack()
        return model

    @property
    def kv_bytes_per_block(self) -> int:
        a = self.arch
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * a.head_dim * self.dtype.itemsize

    def decide_num_blocks(self) -> int:
        """What this rank's budget holds (per rank under tensor parallelism)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.8)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        blocks = budget // self.kv_bytes_per_block
        if blocks < 2:
            raise ValueError(f"KV cache budget {budget} bytes holds fewer than 2 blocks "
                             f"({self.kv_bytes_per_block} bytes each)")
        return int(blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.arch
        shape = (num_blocks, self.block_size, self.num_kv_heads, a.head_dim)
        if self.device.type == "cpu":
            layers = self.num_layers
            flat = huge_page_zeros(2 * layers * math.prod(shape), self.dtype).view(layers, 2, *shape)
            caches = [(layer[0], layer[1]) for layer in flat]
        else:
            caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        log.info("KV cache: %d blocks x %d tokens = %d tokens of capacity, %.1f MiB (%s)",
                 num_blocks, self.block_size, num_blocks * self.block_size,
                 num_blocks * self.kv_bytes_per_block / 2**20, self.dtype)
        return caches

    @property
    def worker_pids(self) -> list[int]:
        return []   # no worker processes of its own

    def check_health(self) -> None:
        """Nothing to watch at tp=1: an error in a step raises from execute() itself."""

    def shutdown(self) -> None:
        """Nothing to stop: the weights and KV cache go with the object."""

    @torch.inference_mode()
    def execute(self, scheduled) -> StepResult:
        """Run one step for `scheduled` (ScheduledSequence list); sample where a sequence caught up."""
        batch = build_flat_batch(scheduled, self.block_size, self.device)
        hidden = self.cuda_graphs.run(batch) if self.cuda_graphs else None    # decode-only steps
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches)
        pooled = self._pool(scheduled, batch, hidden) if self.parallel is None or self.parallel.rank == 0 else {}
        # Embedding rows sample nothing; under tensor parallelism every rank still computes the
        # same logits rows (the gather is a collective the workers join blind).
        rows = [r for r in batch.sample_rows if self.parallel is not None or r not in pooled]
        tokens: list[int | None] = [None] * len(scheduled)
        if not rows:
            return StepResult(tokens, None, pooled=pooled)
        indices = batch.logits_indices if len(rows) == len(batch.sample_rows) else \
            batch.logits_indices[[batch.sample_rows.index(r) for r in rows]]
        logits = self.model.compute_logits(hidden[indices])
        if logits is None:   # a tensor-parallel worker: rank 0 samples
            return StepResult(tokens, None)
        keep = [i for i, r in enumerate(rows) if getattr(scheduled[r].seq, "pooling", None) is None]
        if len(keep) < len(rows):   # tensor parallelism: drop the embedding rows' logits now
            rows, logits = [rows[i] for i in keep], logits[keep]
        if not rows:
            return StepResult(tokens, None, pooled=pooled)
        sampling = SamplingBatch.build([scheduled[i].seq for i in rows], logits.shape[-1], self.eos_token_ids,
                                       self.device)
        result = self.sampler(logits, sampling)
        for row, token in zip(rows, result.token_ids):
            tokens[row] = token
        logprobs = None
        if result.logprobs is not None:
            logprobs = [None] * len(scheduled)
            for row, entry in zip(rows, result.logprobs):
                logprobs[row] = entry
        return StepResult(tokens, logprobs, {rows[i]: why for i, why in result.failed.items()}, pooled)

    @staticmethod
    def _pool(scheduled, batch, hidden: torch.Tensor) -> dict[int, PooledChunk]:
        """Each embedding row's share of its vector from this step's final hidden states."""
        pooled = {}
        starts = batch.meta.query_start_loc_cpu
        for row, entry in enumerate(scheduled):
            mode = getattr(entry.seq, "pooling", None)
            if mode is None:
                continue
            lo, hi = starts[row], starts[row + 1]
            if mode == "mean":
                pooled[row] = PooledChunk(hidden[lo:hi].float().sum(0).cpu(), entry.start_position, hi - lo)
            elif entry.samples:   # "last": only the step that computes the last prompt token
                pooled[row] = PooledChunk(hidden[hi - 1].float().cpu(), entry.seq.num_tokens - 1, 1)
        return pooled
