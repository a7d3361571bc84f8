"""PipelineExecutor: the Executor (interface.py) for --pp > 1 or --nnodes > 1 (any --tp).

The driver is rank 0, in the engine process: the last pipeline stage's tensor rank 0, so it
samples where the logits are (rendezvous.py has the layout). Start-up, in order: split the
layers (a clear ValueError before anything starts) → open the store (--master-addr:port, or
a free loopback port on one host) and, with follower nodes, the liveness listener → publish
the DistSpec → spawn this host's other ranks (dist_worker.rank_main) → wait for every rank to
join (a missing rank is named after --dist-timeout; a failed one's traceback is raised) →
accept one liveness connection per follower node → build rank 0 (dist_worker.build_rank:
process group, communicators, this stage's layers, the KV block count agreed over all ranks)
→ start the monitor thread.
Each step: the schedule as deltas (step_deltas.py) broadcast on the control channel, then rank
0's stage (receive from the stage before, its layers, sample). The monitor watches the local
ranks' sentinels and the follower nodes' liveness connections: an exit or EOF marks the
executor dead, aborts rank 0's shared-memory waits, terminates the local ranks and calls
`death_listener`; a step then raises ExecutorDeadError (gloo also fails a pending receive when
the peer's socket closes). Nothing is restarted: the server answers 503 and exits non-zero."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
from multiprocessing.connection import wait

from gateway.config import Config
from gateway.executor.dist_worker import build_rank, rank_main
from gateway.executor.errors import ExecutorDeadError, RendezvousError
from gateway.executor.interface import StepResult
from gateway.executor.messages import Shutdown
from gateway.executor.parallel import free_port, resolve_backend
from gateway.executor.placement import Placement
from gateway.executor.rendezvous import (DistSpec, Layout, accept_nodes, await_ranks, open_liveness_listener,
                                         open_store, publish_spec)
from gateway.executor.step_deltas import DeltaEncoder
from gateway.models import registry
from gateway.models.partition import split_layers
from gateway.models.tp_layers import shard_plan

log = logging.getLogger("gateway.executor")

COLLECTIVE_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 5


def make_dist_spec(config: Config, hf_config, placement: Placement, liveness) -> DistSpec:
    from gateway.executor.executor import _slot_bytes
    from gateway.executor.shm_comm import ShmCommunicator
    _, arch = registry.resolve(hf_config)
    layout = Layout(config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes)
    stages = split_layers(arch.num_layers, layout.pp, config.pp_layer_counts)
    for tp_rank in range(layout.tp):
        shard_plan(arch, tp_rank, layout.tp)           # unsplittable shapes fail before any spawn
    data = "nccl" if placement.device.type == "cuda" else "gloo"
    tp_backends = []
    for stage in range(layout.pp):
        backend = resolve_backend(config.tp_comm, placement.device.type)
        if backend == "shm" and not layout.on_one_node(layout.tp_group(stage)):
            if config.tp_comm == "shm":
                raise ValueError(f"--tp-comm shm: pipeline stage {stage}'s tensor ranks span hosts")
            backend = "gloo"
        tp_backends.append(backend)
    return DistSpec(config, placement, layout, stages, data, tp_backends, ShmCommunicator.new_name(),
                    liveness, COLLECTIVE_TIMEOUT_S, _slot_bytes(config, arch, layout.tp))


class PipelineExecutor:
    def __init__(self, config: Config, source, hf_config, eos_token_ids: set[int], placement: Placement):
        self.dead_reason: str | None = None
        self.death_listener = None
        self._closing, self._procs, self._nodes, self._listener, self.state = False, [], {}, None, None
        host = config.master_addr if config.nnodes > 1 else "127.0.0.1"
        port = config.master_port or free_port()
        if config.nnodes > 1:
            self._listener = open_liveness_listener(host)
        liveness = (host, self._listener.getsockname()[1]) if self._listener else None
        self.spec = make_dist_spec(config, hf_config, placement, liveness)
        self.layout = self.spec.layout
        self.store = open_store(host, port, config.dist_timeout_s, is_master=True)
        try:
            publish_spec(self.store, self.spec)
            self._spawn_local_ranks((host, port))
            await_ranks(self.store, self.layout, config.dist_timeout_s, self._check_local_ranks)
            if self._listener is not None:
                self._nodes = accept_nodes(self._listener, config.nnodes, config.dist_timeout_s)
            self.state = build_rank(self.spec, self.store, 0)
            self.state.runner.eos_token_ids = eos_token_ids
        except BaseException:
            self.shutdown()
            raise
        self.runner, self.arch = self.state.runner, self.state.runner.arch
        self._encoder = DeltaEncoder()
        threading.Thread(target=self._watch, name="gateway-pp-monitor", daemon=True).start()
        atexit.register(self.shutdown)
        log.info("pipeline parallel: %d stages x %d tensor ranks over %d node(s), layers %s, "
                 "%d KV blocks per rank, local worker pids %s", self.layout.pp, self.layout.tp,
                 self.layout.nnodes, self.spec.stages, self.num_blocks, self.worker_pids)

    # ---- start-up ------------------------------------------------------------------------
    def _spawn_local_ranks(self, store_address) -> None:
        ctx = mp.get_context("spawn")
        for rank in self.layout.node_ranks(0)[1:]:
            proc = ctx.Process(target=rank_main, args=(self.spec, rank, store_address, os.getpid()),
                               name=f"gateway-rank{rank}", daemon=True)
            proc.start()
            self._procs.append((rank, proc))

    def _check_local_ranks(self) -> None:
        for rank, proc in self._procs:
            if proc.exitcode is not None:
                raise RendezvousError(f"{self.layout.describe(rank)} exited during start-up (exit code "
                                   f"{proc.exitcode}; its log is above)")

    # ---- the step ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.state.num_blocks

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for _, proc in self._procs]

    def execute(self, scheduled) -> StepResult:
        self.check_health()
        try:
            self.state.control.send(self._encoder.encode(scheduled))
            return self.runner.execute(scheduled)
        except (RuntimeError, ExecutorDeadError) as exc:   # gloo reports a lost peer as RuntimeError
            self._declare_dead(f"a pipeline step failed: {exc}")
            raise ExecutorDeadError(self.dead_reason) from exc

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise ExecutorDeadError(self.dead_reason)

    def pipeline_stats(self) -> dict:
        return {"control_bytes": self.state.control.bytes_sent, **self.runner.stats()}

    # ---- death and shutdown --------------------------------------------------------------
    def _watch(self) -> None:
        owners = {proc.sentinel: f"{self.layout.describe(rank)} (pid {proc.pid}) exited"
                  for rank, proc in self._procs}
        for node, conn in self._nodes.items():
            ranks = self.layout.node_ranks(node)
            owners[conn] = (f"node {node} (ranks {ranks.start}-{ranks.stop - 1}) disconnected: its "
                            f"`gateway worker` exited or the network failed")
        while not self._closing and owners:
            ready = wait(list(owners), timeout=1.0)
            if ready and not self._closing:
                self._declare_dead(owners[ready[0]])
                return

    def _declare_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        log.error("%s; the engine stops (ranks are not restarted)", reason)
        self.dead_reason = reason
        comm = self.state.comm if self.state is not None else None
        if comm is not None and hasattr(comm, "abort"):
            comm.abort = reason
        for _, proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        if self.death_listener is not None:
            self.death_listener()

    def shutdown(self) -> None:
        """Idempotent: Shutdown to every rank (when all are alive), wait briefly, then terminate."""
        if self._closing:
            return
        self._closing = True
        if self.state is not None and self.dead_reason is None:
            try:
                self.state.control.send(Shutdown())
            except RuntimeError:
                pass
        for _, proc in self._procs:
            proc.join(SHUTDOWN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for conn in self._nodes.values():
            conn.close()
        if self._listener is not None:
            self._listener.close()
        self._close_collectives()

    def _close_collectives(self) -> None:
        import torch.distributed as dist
        if self.state is not None and self.state.comm is not None:
            self.state.comm.close()
        if dist.is_initialized() and self.dead_reason is None:   # a dead peer could hang the teardown
            dist.destroy_process_group()
