"""One rank of a pipeline-parallel (or multi-host) run: `build_rank` (every rank, the driver
included) and `rank_main` (the spawn target of the ranks other than the driver).

build_rank, in order: join the process group over the leader's store → this stage's tensor
communicator (shared memory when the stage's tensor ranks share a host: its first rank creates
the segment, a barrier, the others attach; otherwise a gloo/NCCL subgroup) → this rank's
StageRunner (only its layers' weights, read lazily) → agree on the KV cache over the control
group: every rank reports (block size, blocks its budget holds, model shape), all check they
match and allocate the minimum.
rank_main: logging and threads → the store (set `joined`) → build_rank → loop: receive a step
message on the control channel, update the sequence mirror, run the stage → until Shutdown.
A failure is published under `gateway/failed/<rank>` (the leader raises it) and exits 1."""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from dataclasses import dataclass

from gateway.executor.errors import RendezvousError
from gateway.executor.rendezvous import DistSpec

log = logging.getLogger("gateway.worker")


@dataclass
class RankState:
    runner: object          # StageRunner
    control: object         # ControlChannel
    comm: object | None     # this stage's tensor communicator (tp > 1)
    num_blocks: int


def build_rank(spec: DistSpec, store, rank: int, parent_pid: int | None = None) -> RankState:
    import torch.distributed as dist

    from gateway.executor.rendezvous import ControlChannel, init_process_group
    from gateway.executor.stage_runner import StageRunner
    from gateway.models.loader import load_hf_config
    from gateway.models.partition import LayerStage
    from gateway.models.tp_layers import ParallelContext

    layout, config = spec.layout, spec.config
    control = ControlChannel(init_process_group(spec, store, rank))
    stage, tp_rank = layout.stage_of(rank), layout.tp_rank_of(rank)
    comm = _tp_communicator(spec, stage, tp_rank, parent_pid)
    start, count = spec.stages[stage]
    source = _local_source(config)
    runner = StageRunner(config, source, load_hf_config(source), set(),
                         ParallelContext(tp_rank, layout.tp, comm) if comm is not None else None,
                         spec.placement, LayerStage(start, count, stage == 0, stage == layout.pp - 1),
                         prev_rank=layout.rank_of(stage - 1, tp_rank) if stage > 0 else None,
                         next_rank=layout.rank_of(stage + 1, tp_rank) if stage < layout.pp - 1 else None)
    reports = [None] * layout.world
    mine = (config.block_size, runner.decide_num_blocks(), runner.arch.hidden_size, runner.arch.num_layers,
            runner.arch.vocab_size)
    dist.all_gather_object(reports, mine, group=control._group)
    num_blocks = _agree_on_cache(layout, reports)
    runner.init_kv_cache(num_blocks)
    return RankState(runner, control, comm, num_blocks)


def _local_source(config):
    from pathlib import Path

    from gateway.models import registry
    from gateway.models.loader import resolve_source
    if config.model_module:
        registry.load_model_module(config.model_module)
    return resolve_source(config.model, Path(config.cache_dir).expanduser())


def _agree_on_cache(layout, reports) -> int:
    """The KV cache every rank allocates: the same block size and model everywhere, the fewest blocks."""
    first = reports[0]
    for rank, report in enumerate(reports):
        if report[0] != first[0] or report[2:] != first[2:]:
            raise RendezvousError(f"{layout.describe(rank)} disagrees with rank 0 on (block size, hidden, "
                               f"layers, vocab): {report[0:1] + report[2:]} vs {first[0:1] + first[2:]}; "
                               f"every node must load the same model")
    return min(report[1] for report in reports)


def _tp_communicator(spec: DistSpec, stage: int, tp_rank: int, parent_pid: int | None):
    import torch.distributed as dist

    from gateway.executor.parallel import TorchDistCommunicator
    from gateway.executor.shm_comm import ShmCommunicator
    layout, backend = spec.layout, spec.tp_backends[stage]
    groups = [dist.new_group(layout.tp_group(s)) if layout.tp > 1 and spec.tp_backends[s] != "shm" else None
              for s in range(layout.pp)]                  # every rank creates every group, in order
    if layout.tp == 1:
        return None
    if backend != "shm":
        comm = TorchDistCommunicator.over_group(groups[stage], tp_rank, layout.tp, layout.tp_group(stage)[0])
    name, shm = f"{spec.shm_base}_s{stage}", backend == "shm"
    if shm and tp_rank == 0:
        comm = ShmCommunicator(name, 0, layout.tp, spec.slot_bytes, spec.collective_timeout_s, create=True)
    if "shm" in spec.tp_backends:
        dist.barrier()      # every segment exists before anyone attaches
    if shm and tp_rank > 0:
        comm = ShmCommunicator(name, tp_rank, layout.tp, spec.slot_bytes, spec.collective_timeout_s,
                               parent_pid=parent_pid)
    return comm


# ---- a spawned rank --------------------------------------------------------------------------
def rank_main(spec: DistSpec, rank: int, store_address: tuple[str, int], parent_pid: int,
              die_with_parent: bool = False) -> None:
    store = None
    try:
        _setup_process(spec, rank, die_with_parent)
        from gateway.executor.rendezvous import mark_joined, open_store
        store = open_store(*store_address, spec.config.dist_timeout_s, is_master=False)
        mark_joined(store, rank)
        state = build_rank(spec, store, rank, parent_pid)
        _serve_steps(state)
        log.info("stage %d: %s", spec.layout.stage_of(rank), state.runner.stats())
        _close(state)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        error = traceback.format_exc()
        log.error("%s failed:\n%s", spec.layout.describe(rank), error)
        if store is not None:
            from gateway.executor.rendezvous import mark_failed
            mark_failed(store, rank, error)
        sys.exit(1)


def _setup_process(spec: DistSpec, rank: int, die_with_parent: bool) -> None:
    import torch

    from gateway.executor.placement import threads_per_rank
    config = spec.config
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the leader stops us
    if die_with_parent:
        _kill_me_with_parent()
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    torch.set_num_threads(threads_per_rank(config))
    if spec.placement.device.type == "cuda":
        torch.cuda.set_device(rank % spec.layout.local_world)


def _kill_me_with_parent() -> None:
    """PR_SET_PDEATHSIG: a follower node's ranks die with their `gateway worker` process."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _serve_steps(state: RankState) -> None:
    import torch

    from gateway.executor.messages import Shutdown
    from gateway.executor.step_deltas import SequenceMirror
    mirror = SequenceMirror()
    with torch.inference_mode():
        while True:
            message = state.control.recv()
            if isinstance(message, Shutdown):
                return
            rows = mirror.apply(message)
            if rows:
                state.runner.execute(rows)


def _close(state: RankState) -> None:
    import torch.distributed as dist
    if state.comm is not None:
        state.comm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
