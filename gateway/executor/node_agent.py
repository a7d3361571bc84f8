"""`gateway worker`: one follower node of a multi-host run (node 0 is `gateway serve`).

In order: connect to the leader's TCPStore (a follower started first retries until
--dist-timeout) → read the leader's DistSpec (configuration, model, layout: nothing on this
command line but where to meet and which node this is) → open the liveness connection → spawn
this node's ranks (dist_worker.rank_main; they die with this process, PR_SET_PDEATHSIG) →
watch them and the connection: a rank that exits non-zero ends the others and this process
(exit 1; the leader sees the connection close); the leader going away ends the ranks (exit 0
when they finished on its Shutdown, 1 otherwise).
torchrun is accepted with --nproc-per-node 1: MASTER_ADDR, MASTER_PORT and GROUP_RANK fill the
flags (config.py), WORLD_SIZE and RANK give --nnodes and --node-rank when those are not given."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from multiprocessing.connection import wait

from gateway.config import Config

log = logging.getLogger("gateway.worker")

GRACE_S = 5


def worker_command(config: Config, environ) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[node {config.node_rank}]: %(message)s")
    config = _torchrun_defaults(config, environ)
    if config.node_rank == 0:
        raise ValueError("node 0 is the leader (`gateway serve --nnodes N ...`); give a worker --node-rank >= 1")
    if config.master_port is None:
        raise ValueError("gateway worker needs --master-port (or $MASTER_PORT): the leader's rendezvous port")
    from gateway.executor.rendezvous import connect_liveness, open_store, read_spec
    store = open_store(config.master_addr, config.master_port, config.dist_timeout_s, is_master=False)
    spec = read_spec(store)
    layout = spec.layout
    if layout.nnodes != config.nnodes:
        raise ValueError(f"the leader runs --nnodes {layout.nnodes}, this worker was given --nnodes {config.nnodes}")
    liveness = connect_liveness(spec.liveness, config.node_rank)
    procs = _spawn(spec, layout.node_ranks(config.node_rank), (config.master_addr, config.master_port))
    log.info("node %d: ranks %s (pids %s) joining %s:%d", config.node_rank, list(layout.node_ranks(config.node_rank)),
             [p.pid for p in procs], config.master_addr, config.master_port)
    return _watch(procs, liveness)


def _torchrun_defaults(config: Config, environ) -> Config:
    if "LOCAL_RANK" not in environ or config.nnodes > 1:
        return config
    if int(environ["LOCAL_RANK"]) != 0:
        raise ValueError("under torchrun, start gateway worker with --nproc-per-node 1 (it spawns its node's ranks)")
    return config.replace(nnodes=int(environ.get("WORLD_SIZE", "1")), node_rank=int(environ.get("RANK", "0")))


def _spawn(spec, ranks, store_address) -> list:
    from gateway.executor.dist_worker import rank_main
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        proc = ctx.Process(target=rank_main, args=(spec, rank, store_address, os.getpid(), True),
                           name=f"gateway-rank{rank}", daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def _watch(procs, liveness) -> int:
    pending = {p.sentinel: p for p in procs}
    while pending:
        ready = wait([*pending, liveness], timeout=1.0)
        for obj in ready:
            if obj is liveness:
                return _leader_gone(list(pending.values()))
            proc = pending.pop(obj)
            proc.join()
            if proc.exitcode != 0:
                log.error("rank process %s (pid %d) exited with %s; stopping this node", proc.name, proc.pid,
                          proc.exitcode)
                _stop(list(pending.values()))
                return 1
    return 0


def _leader_gone(procs) -> int:
    """The liveness connection closed: after a clean shutdown the ranks are exiting already."""
    for proc in procs:
        proc.join(GRACE_S)
    clean = all(p.exitcode == 0 for p in procs)
    _stop(procs)
    if not clean:
        log.error("the leader went away; this node's ranks were stopped")
    return 0 if clean else 1


def _stop(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(1)
