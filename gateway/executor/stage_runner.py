"""StageRunner: one rank's ModelRunner under pipeline parallelism (a LayerStage of the model).

Each step is cut into two micro-batches of about equal tokens (split_rows, the same cut on every
rank), so two are in flight: the next stage runs the first while this one runs the second.
Per micro-batch, in order: the flat batch (every rank builds the same one from the same rows) →
not the first stage: receive the previous stage's [2, T, H] (hidden, residual) from the rank
with the same tensor rank there → this stage's layers → not the last stage: send the result
to the next stage and return a StepResult of Nones; the last stage goes on as ModelRunner
does (logits of the sampled rows, gathered on its tensor rank 0, the driver, which samples).
Sends and receives are torch.distributed point-to-point on the default group (gloo on CPU,
NCCL on CUDA). Counters (bytes sent, seconds waiting for the previous stage, seconds
computing) feed the benchmark's bytes-per-step and idle-fraction figures."""

from __future__ import annotations

import time

import torch

from gateway.executor.batch import build_flat_batch
from gateway.executor.interface import StepResult
from gateway.executor.model_runner import ModelRunner


class _FedModel:
    """The last stage's model as ModelRunner calls it: the forward gets the received tensor."""

    def __init__(self, runner: "StageRunner", model):
        self._runner, self._model = runner, model

    def __call__(self, input_ids, positions, meta, kv_caches):
        return self._model(input_ids, positions, meta, kv_caches, intermediate=self._runner.received)

    def __getattr__(self, name):
        return getattr(self._model, name)


class StageRunner(ModelRunner):
    def __init__(self, config, source, hf_config, eos_token_ids, parallel, placement, stage,
                 prev_rank: int | None, next_rank: int | None):
        super().__init__(config, source, hf_config, eos_token_ids, parallel, placement, stage)
        import torch.distributed as dist
        self._dist, self.prev_rank, self.next_rank = dist, prev_rank, next_rank
        self.stage_model, self.received = self.model, None
        if not stage.is_first:
            self.model = _FedModel(self, self.stage_model)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.bytes_sent = self.bytes_received = self.steps = 0
        self.wait_s = self.compute_s = 0.0

    @torch.inference_mode()
    def execute(self, scheduled) -> StepResult:
        self.steps += 1
        parts = split_rows(scheduled)
        results = [self._execute_part(part) for part in parts]
        return results[0] if len(results) == 1 else merge_results(results, [len(p) for p in parts])

    def _execute_part(self, scheduled) -> StepResult:
        if not self.stage.is_first:
            started = time.perf_counter()
            tokens = sum(entry.num_new_tokens for entry in scheduled)
            self.received = torch.empty((2, tokens, self.arch.hidden_size), dtype=self.dtype, device=self.device)
            self._dist.recv(self.received, self.prev_rank)
            self.wait_s += time.perf_counter() - started
            self.bytes_received += self.received.numel() * self.received.element_size()
        started = time.perf_counter()
        try:
            if self.stage.is_last:
                return super().execute(scheduled)
            batch = build_flat_batch(scheduled, self.block_size, self.device)
            out = self.stage_model(batch.input_ids, batch.positions, batch.meta, self.kv_caches,
                                   intermediate=self.received)
        finally:
            self.compute_s += time.perf_counter() - started
            self.received = None
        self._dist.send(out.contiguous(), self.next_rank)
        self.bytes_sent += out.numel() * out.element_size()
        return StepResult([None] * len(scheduled), None)

    def stats(self) -> dict:
        return {"steps": self.steps, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "wait_s": self.wait_s, "compute_s": self.compute_s}


def split_rows(scheduled) -> list:
    """Two micro-batches of about equal tokens (one for a single row), cut the same way on every
    rank: while the next stage runs the first, this one runs the second. Each keeps the
    scheduler's order (one-token rows first), which build_flat_batch requires."""
    if len(scheduled) < 2:
        return [scheduled]
    tokens = [entry.num_new_tokens for entry in scheduled]
    half, total, cut = sum(tokens) / 2, 0, len(tokens) - 1
    for index, count in enumerate(tokens):
        total += count
        if total >= half:
            cut = index + 1
            break
    cut = min(max(cut, 1), len(scheduled) - 1)
    return [scheduled[:cut], scheduled[cut:]]


def merge_results(results: list[StepResult], sizes: list[int]) -> StepResult:
    """The micro-batches' results as one step's, rows in the scheduler's order."""
    tokens, errors, pooled, logprobs = [], {}, {}, None
    if any(r.logprobs is not None for r in results):
        logprobs = []
    offset = 0
    for result, size in zip(results, sizes):
        tokens += result.token_ids
        if logprobs is not None:
            logprobs += result.logprobs if result.logprobs is not None else [None] * size
        errors.update({offset + row: why for row, why in result.errors.items()})
        pooled.update({offset + row: chunk for row, chunk in getattr(result, "pooled", {}).items()})
        offset += size
    merged = StepResult(tokens, logprobs, errors)
    if pooled:
        merged.pooled = pooled
    return merged
