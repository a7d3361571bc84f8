"""A tensor-parallel worker process (ranks 1..N-1; rank 0 is the driver, in the engine process).

`worker_main(spec, conn)` is the spawn target. In order: logging and thread count → the
user model module, if any → (CUDA) select device `rank` → join the communicator (attach the
shm segment or the torch.distributed group) → build and load this rank's model shard →
send WorkerReady(max KV blocks) → receive InitKVCache and allocate → loop: receive a
StepMessage, update the sequence mirror, run the forward (taking part in every collective;
rank 0 samples) → until Shutdown, or EOF when the driver is gone. SIGINT is ignored (a
terminal's Ctrl-C reaches the whole process group; the driver shuts the workers down). Any error is reported as
WorkerFailed (the traceback) before exiting non-zero; the driver's monitor sees the exit."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import traceback

from gateway.executor.messages import InitKVCache, Shutdown, WorkerFailed, WorkerReady, WorkerSpec

log = logging.getLogger("gateway.worker")


def worker_main(spec: WorkerSpec, conn) -> None:
    try:
        runner, comm = _start(spec)
        conn.send(WorkerReady(spec.rank, os.getpid(), runner.decide_num_blocks()))
        init = conn.recv()
        assert isinstance(init, InitKVCache), f"expected InitKVCache, got {type(init).__name__}"
        runner.init_kv_cache(init.num_blocks)
        _serve_steps(runner, conn)
    except EOFError:   # the driver closed the pipe or died: nothing to report to
        sys.exit(0)
    except BaseException:
        _report(conn, WorkerFailed(spec.rank, traceback.format_exc()))
        sys.exit(1)
    comm.close()


def _start(spec: WorkerSpec):
    import torch

    from gateway.executor.model_runner import ModelRunner
    from gateway.executor.parallel import create_communicator
    from gateway.models import registry
    from gateway.models.loader import load_hf_config
    from gateway.models.tp_layers import ParallelContext

    config = spec.config
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the driver stops us
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {spec.rank}]: %(message)s")
    torch.set_num_threads(spec.num_threads)
    if config.model_module:
        registry.load_model_module(config.model_module)
    if spec.placement.device.type == "cuda":
        torch.cuda.set_device(spec.rank)
    comm = create_communicator(spec.comm, spec.rank, parent_pid=spec.parent_pid)
    parallel = ParallelContext(spec.rank, spec.comm.world_size, comm)
    runner = ModelRunner(config, spec.source, load_hf_config(spec.source), set(), parallel, spec.placement)
    return runner, comm


def _serve_steps(runner, conn) -> None:
    import torch

    from gateway.executor.step_deltas import SequenceMirror

    mirror = SequenceMirror()
    with torch.inference_mode():
        while True:
            message = pickle.loads(conn.recv_bytes())
            if isinstance(message, Shutdown):
                return
            rows = mirror.apply(message)
            if rows:
                runner.execute(rows)


def _report(conn, failure: WorkerFailed) -> None:
    log.error("tensor-parallel worker rank %d failed:\n%s", failure.rank, failure.error)
    try:
        conn.send(failure)
    except (OSError, ValueError):
        pass
