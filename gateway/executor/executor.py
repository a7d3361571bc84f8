"""`create_executor(config, source, hf_config, eos_token_ids)`: what EngineCore runs steps on.

tensor_parallel_size 1 → the plain ModelRunner: no worker processes, no collectives.
pipeline_parallel_size > 1 or nnodes > 1 → PipelineExecutor (dist_executor.py).
N > 1 → TensorParallelExecutor: rank 0 is the driver, in this process (the engine thread
runs its forward and samples); ranks 1..N-1 are spawned worker processes (worker.py).

Start-up, in order: check the model can be split N ways (a clear ValueError before anything
starts) → pick the collective backend and its address (shm segment created here, or a free
TCP port) → spawn the workers (they load their shards while we load ours) → join the
communicator → build rank 0's shard → READY handshake (each worker reports its KV capacity;
a failure or exit is raised with the worker's traceback) → the minimum block count over
ranks goes to every rank → allocate → start the monitor thread.
Each step: encode the schedule as deltas (step_deltas.py), send the same pickled bytes to
every worker, run rank 0's forward + sampling. The monitor watches worker sentinels and
pipes: a worker that exits or reports a failure marks the executor dead, aborts rank 0's
collective waits, terminates the other workers and calls `death_listener`;
`check_health()` and `execute()` then raise ExecutorDeadError (errors.py; the engine loop's crash path).
Dead workers are not restarted: the server reports 503 and exits non-zero (api/server.py)."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import threading
from multiprocessing.connection import wait

from gateway.config import Config
from gateway.executor.errors import ExecutorDeadError
from gateway.executor.interface import Executor, StepResult
from gateway.executor.messages import InitKVCache, Shutdown, WorkerFailed, WorkerReady, WorkerSpec
from gateway.executor.model_runner import ModelRunner
from gateway.executor.parallel import create_communicator, make_spec, resolve_backend
from gateway.executor.placement import Placement, resolve_placement, threads_per_rank
from gateway.executor.step_deltas import DeltaEncoder
from gateway.executor.worker import worker_main
from gateway.models import registry
from gateway.models.loader import ModelSource
from gateway.models.tp_layers import ParallelContext, shard_plan

log = logging.getLogger("gateway.executor")

START_TIMEOUT_S = 900        # a worker loading a large checkpoint
COLLECTIVE_TIMEOUT_S = 120   # longest wait for a peer inside one step
SHUTDOWN_TIMEOUT_S = 5


def create_executor(config: Config, source: ModelSource, hf_config, eos_token_ids: set[int]) -> Executor:
    placement = resolve_placement(config, hf_config)   # once, for every rank
    if config.pipeline_parallel_size > 1 or config.nnodes > 1:   # ranks over torch.distributed
        from gateway.executor.dist_executor import PipelineExecutor
        return PipelineExecutor(config, source, hf_config, eos_token_ids, placement)
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, source, hf_config, eos_token_ids, placement=placement)
    return TensorParallelExecutor(config, source, hf_config, eos_token_ids, placement)


def _slot_bytes(config: Config, arch, world_size: int) -> int:
    """Shared-memory slot: the widest gather (fp32 logits of max_num_seqs rows of the widest
    vocab shard), at least 4 MiB; bigger all-reduces are chunked through it."""
    vocab_shard = -(-arch.vocab_size // world_size)
    return max(4 * 2**20, config.max_num_seqs * vocab_shard * 4)


class TensorParallelExecutor:
    """The Executor (interface.py) for tensor_parallel_size > 1."""

    def __init__(self, config: Config, source: ModelSource, hf_config, eos_token_ids: set[int],
                 placement: Placement):
        world = config.tensor_parallel_size
        _, arch = registry.resolve(hf_config)
        for rank in range(world):
            shard_plan(arch, rank, world)          # unsplittable shapes fail here, before any spawn
        backend = resolve_backend(config.tp_comm, placement.device.type)
        self.spec = make_spec(backend, world, COLLECTIVE_TIMEOUT_S, _slot_bytes(config, arch, world))
        self.dead_reason: str | None = None
        self.death_listener = None                 # called (from the monitor thread) on death
        self._closing = False
        self._procs, self._conns = [], []
        self.comm = create_communicator(self.spec, 0) if backend == "shm" else None
        try:
            self._spawn_workers(config, source, placement)
            if self.comm is None:
                self.comm = create_communicator(self.spec, 0)
            self.runner = ModelRunner(config, source, hf_config, eos_token_ids,
                                      ParallelContext(0, world, self.comm), placement)
            self._agree_on_kv_blocks(self._await_ready())
        except BaseException:
            self.shutdown()
            raise
        self.arch, self.eos_token_ids = self.runner.arch, eos_token_ids
        self._encoder = DeltaEncoder()
        self._monitor = threading.Thread(target=self._watch_workers, name="gateway-tp-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)   # an LLM nobody closed still stops its workers, frees the segment
        log.info("tensor parallel: %d ranks (%s collectives), worker pids %s, %d KV blocks per rank",
                 world, backend, self.worker_pids, self.num_blocks)

    # ---- start-up ------------------------------------------------------------------------
    def _spawn_workers(self, config: Config, source: ModelSource, placement: Placement) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, config.tensor_parallel_size):
            ours, theirs = ctx.Pipe(duplex=True)
            spec = WorkerSpec(config, source, placement, rank, self.spec, os.getpid(), threads_per_rank(config))
            proc = ctx.Process(target=worker_main, args=(spec, theirs), name=f"gateway-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    def _await_ready(self) -> list[WorkerReady]:
        ready = []
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            if not wait([conn, proc.sentinel], timeout=START_TIMEOUT_S):
                raise RuntimeError(f"tensor-parallel rank {rank} sent no READY within {START_TIMEOUT_S}s")
            message = conn.recv() if conn.poll() else None
            if isinstance(message, WorkerFailed):
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{message.error}")
            if not isinstance(message, WorkerReady):
                proc.join(1)
                raise RuntimeError(f"tensor-parallel rank {rank} exited during start-up (exit code {proc.exitcode})")
            ready.append(message)
        return ready

    def _agree_on_kv_blocks(self, ready: list[WorkerReady]) -> None:
        num_blocks = min([self.runner.decide_num_blocks()] + [r.max_num_blocks for r in ready])
        for conn in self._conns:
            conn.send(InitKVCache(num_blocks))
        self.runner.init_kv_cache(num_blocks)

    # ---- the step ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def execute(self, scheduled) -> StepResult:
        self.check_health()
        payload = pickle.dumps(self._encoder.encode(scheduled), pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(payload)
            except OSError as exc:
                self._declare_dead(f"cannot reach tensor-parallel rank {rank}: {exc!r}")
                self.check_health()
        return self.runner.execute(scheduled)

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise ExecutorDeadError(self.dead_reason)

    # ---- death and shutdown --------------------------------------------------------------
    def _watch_workers(self) -> None:
        owners = {}
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            owners[proc.sentinel], owners[conn] = rank, rank
        while not self._closing:
            for obj in wait(list(owners), timeout=1.0):
                if self._closing:
                    return
                rank = owners[obj]
                self._declare_dead(self._death_reason(rank, obj))
                return

    def _death_reason(self, rank: int, obj) -> str:
        proc = self._procs[rank - 1]
        if obj is self._conns[rank - 1]:
            try:
                message = obj.recv()
                if isinstance(message, WorkerFailed):
                    return f"tensor-parallel rank {rank} failed:\n{message.error}"
            except (EOFError, OSError):
                pass
        proc.join(0.5)
        return f"tensor-parallel rank {rank} (pid {proc.pid}) died (exit code {proc.exitcode})"

    def _declare_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        log.error("%s; the engine stops (workers are not restarted)", reason)
        self.dead_reason = reason
        if self.comm is not None and hasattr(self.comm, "abort"):
            self.comm.abort = reason                # ends rank 0's spin-waits at once
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()                    # peers would otherwise wait out their timeout
        if self.death_listener is not None:
            self.death_listener()

    def shutdown(self) -> None:
        """Idempotent: ask the workers to stop, wait briefly, then terminate; free the segment."""
        if self._closing:
            return
        self._closing = True
        for conn in self._conns:
            try:
                conn.send(Shutdown())
            except OSError:
                pass
        for proc in self._procs:
            proc.join(SHUTDOWN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for conn in self._conns:
            conn.close()
        if self.comm is not None:
            self.comm.close()
