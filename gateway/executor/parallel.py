"""Collectives between tensor-parallel ranks: the implementations of `Communicator` (the
interface the model shards call, declared with them in models/tp_layers.py):
all_reduce(t) sums in place over ranks; gather(t) concatenates along the last dim on rank 0.

Implementations: ShmCommunicator (shm_comm.py; CPU ranks on one host, the CPU default
because it measured 15-45x faster than gloo at p50, see the README) and
TorchDistCommunicator (torch.distributed: gloo on CPU, NCCL on CUDA, rendezvous over TCP on
a free loopback port).
`CommSpec` is what the driver decides once and sends to every rank; `create_communicator`
turns it into the rank's communicator (joining the process group or attaching the segment)."""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch

from gateway.models.tp_layers import Communicator


@dataclass(frozen=True)
class CommSpec:
    backend: str              # shm | gloo | nccl
    world_size: int
    timeout_s: float
    address: str = ""         # shm: segment name; gloo/nccl: tcp://127.0.0.1:PORT
    slot_bytes: int = 0       # shm only


def resolve_backend(requested: str, device_type: str) -> str:
    """auto → shm on CPU, nccl on CUDA; explicit choices are checked against the device."""
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "shm"
    if requested == "nccl" and device_type != "cuda":
        raise ValueError("--tp-comm nccl needs --device cuda")
    if requested == "shm" and device_type != "cpu":
        raise ValueError("--tp-comm shm is the CPU backend; use nccl (or gloo) on CUDA")
    return requested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_spec(backend: str, world_size: int, timeout_s: float, slot_bytes: int) -> CommSpec:
    """The driver's side: pick the rendezvous address (a free port or a unique segment name)."""
    if backend == "shm":
        from gateway.executor.shm_comm import ShmCommunicator
        return CommSpec(backend, world_size, timeout_s, ShmCommunicator.new_name(), slot_bytes)
    return CommSpec(backend, world_size, timeout_s, f"tcp://127.0.0.1:{free_port()}")


def create_communicator(spec: CommSpec, rank: int, parent_pid: int | None = None) -> Communicator:
    """Rank 0 creates the shm segment, so it must run this before the workers attach."""
    if spec.backend == "shm":
        from gateway.executor.shm_comm import ShmCommunicator
        return ShmCommunicator(spec.address, rank, spec.world_size, spec.slot_bytes, spec.timeout_s,
                               create=rank == 0, parent_pid=parent_pid)
    return TorchDistCommunicator(spec, rank)


class TorchDistCommunicator:
    """torch.distributed (gloo / NCCL). Collective timeouts come from the process group."""

    def __init__(self, spec: CommSpec, rank: int):
        import torch.distributed as dist
        self.rank, self.world_size = rank, spec.world_size
        self.abort: str | None = None   # the process group's own timeout bounds every wait
        dist.init_process_group(spec.backend, init_method=spec.address, rank=rank, world_size=spec.world_size,
                                timeout=datetime.timedelta(seconds=spec.timeout_s))
        self._dist, self._group, self._root = dist, None, 0
        self._widths: list[int] | None = None   # each rank's gather width; fixed per model

    @classmethod
    def over_group(cls, group, rank: int, world_size: int, root: int) -> "TorchDistCommunicator":
        """A pipeline stage's tensor ranks: a subgroup of the already joined world; `root` is the
        global rank of the group's rank 0 (where gather lands)."""
        comm = cls.__new__(cls)
        import torch.distributed as dist
        comm.rank, comm.world_size, comm.abort = rank, world_size, None
        comm._dist, comm._group, comm._root, comm._widths = dist, group, root, None
        return comm

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(t, group=self._group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor | None:
        """torch's gather wants equal shapes: pad the last dim to the widest rank's, then trim."""
        t = t.contiguous()
        widths = self._gather_widths(t)
        padded = torch.nn.functional.pad(t, (0, max(widths) - t.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        self._dist.gather(padded, parts, dst=self._root, group=self._group)
        if self.rank != 0:
            return None
        return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)

    def _gather_widths(self, t: torch.Tensor) -> list[int]:
        if self._widths is None or self._widths[self.rank] != t.shape[-1]:
            width = torch.tensor([t.shape[-1]], device=t.device)
            widths = [torch.zeros_like(width) for _ in range(self.world_size)]
            self._dist.all_gather(widths, width, group=self._group)
            self._widths = [int(w) for w in widths]
        return self._widths

    def close(self) -> None:
        if self._group is None and self._dist.is_initialized():   # a subgroup goes with its world
            self._dist.destroy_process_group()
