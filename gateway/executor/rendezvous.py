"""How the ranks of a pipeline- (and tensor-) parallel run find each other, on one host or many.

Layout: world = tp x pp ranks; rank r is tensor rank r % tp of pipeline stage pp-1 - r // tp,
so rank 0, the driver inside the engine process, holds the LAST stage (it samples with no
logits crossing a wire) and the first stage (the embedding) is on the last node. Node n hosts
ranks [n L, (n + 1) L), L = world / nnodes.

Rendezvous, in order: the leader opens a torch.distributed TCPStore on --master-addr:port and
a liveness listener, publishes the DistSpec (config, placement, layout, backends) under
`gateway/spec` → every other rank connects (a follower started first retries until
--dist-timeout), sets `gateway/joined/<rank>` (or `gateway/failed/<rank>` with its traceback)
→ the leader waits for every rank and names the missing ones when the timeout passes → all
init the process group over the same store. Each follower node also holds one TCP connection
to the liveness listener: its EOF tells the leader within milliseconds that the node died.
Step messages travel on a gloo control group (ControlChannel: one broadcast of a fixed buffer,
a second only for long messages); its timeout is effectively infinite because an idle server
sends nothing, while a dead peer still ends the wait at once (gloo sees the socket close)."""

from __future__ import annotations

import datetime
import pickle
import socket
import time
from dataclasses import dataclass

import torch

from gateway.config import Config
from gateway.executor.errors import RendezvousError
from gateway.executor.placement import Placement

SPEC_KEY, JOINED, FAILED = "gateway/spec", "gateway/joined/", "gateway/failed/"
CONTROL_BYTES = 16 * 1024              # one broadcast carries a step's deltas for ~100 sequences
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    nnodes: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def local_world(self) -> int:
        return self.world // self.nnodes

    def stage_of(self, rank: int) -> int:
        return self.pp - 1 - rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return (self.pp - 1 - stage) * self.tp + tp_rank

    def node_of(self, rank: int) -> int:
        return rank // self.local_world

    def node_ranks(self, node: int) -> range:
        return range(node * self.local_world, (node + 1) * self.local_world)

    def tp_group(self, stage: int) -> list[int]:
        return [self.rank_of(stage, t) for t in range(self.tp)]

    def on_one_node(self, ranks: list[int]) -> bool:
        return len({self.node_of(r) for r in ranks}) == 1

    def describe(self, rank: int) -> str:
        return (f"rank {rank} (node {self.node_of(rank)}, pipeline stage {self.stage_of(rank)}, "
                f"tensor rank {self.tp_rank_of(rank)})")


@dataclass(frozen=True)
class DistSpec:
    """What the leader decides once; every rank reads it from the store."""
    config: Config
    placement: Placement
    layout: Layout
    stages: list[tuple[int, int]]           # (first layer, count) per pipeline stage
    data_backend: str                       # gloo | nccl: stage-to-stage sends
    tp_backends: list[str]                  # per stage: shm | gloo | nccl
    shm_base: str                           # stage s's segment: f"{shm_base}_s{s}"
    liveness: tuple[str, int] | None        # the leader's liveness listener (nnodes > 1)
    collective_timeout_s: float
    slot_bytes: int = 0                     # shared-memory slot (executor._slot_bytes)
    

# ---- the store -----------------------------------------------------------------------------
def open_store(host: str, port: int, timeout_s: float, is_master: bool):
    import torch.distributed as dist
    try:
        return dist.TCPStore(host, port, None, is_master, datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        what = "open the rendezvous store on" if is_master else "reach the leader's rendezvous store at"
        raise RendezvousError(f"cannot {what} {host}:{port} within {timeout_s:.0f}s: {exc}") from exc


def publish_spec(store, spec: DistSpec) -> None:
    store.set(SPEC_KEY, pickle.dumps(spec, pickle.HIGHEST_PROTOCOL))


def read_spec(store) -> DistSpec:
    return pickle.loads(store.get(SPEC_KEY))


def mark_joined(store, rank: int) -> None:
    store.set(f"{JOINED}{rank}", b"1")


def mark_failed(store, rank: int, error: str) -> None:
    try:
        store.set(f"{FAILED}{rank}", error.encode())
    except Exception:   # the store (the leader) may be what failed
        pass


def await_ranks(store, layout: Layout, timeout_s: float, check_local=lambda: None) -> None:
    """Until every rank 1.. has joined; raises naming the missing ranks or a failed one's traceback.
    check_local raises when a locally spawned rank has exited."""
    deadline, waiting = time.monotonic() + timeout_s, set(range(1, layout.world))
    while waiting:
        for rank in sorted(waiting):
            if store.check([f"{FAILED}{rank}"]):
                raise RendezvousError(f"{layout.describe(rank)} failed to start:\n{store.get(f'{FAILED}{rank}').decode()}")
            if store.check([f"{JOINED}{rank}"]):
                waiting.discard(rank)
        check_local()
        if waiting and time.monotonic() > deadline:
            raise RendezvousError(_missing_message(layout, sorted(waiting), timeout_s))
        if waiting:
            time.sleep(0.05)


def _missing_message(layout: Layout, missing: list[int], timeout_s: float) -> str:
    nodes = sorted({layout.node_of(r) for r in missing})
    hint = "".join(f"\n  node {n}: is `gateway worker --nnodes {layout.nnodes} --node-rank {n} --master-addr ... "
                   f"--master-port ...` running?" for n in nodes if n > 0)
    names = "; ".join(layout.describe(r) for r in missing)
    return f"rank(s) {missing} did not join within {timeout_s:.0f}s (--dist-timeout): {names}{hint}"


# ---- liveness: one TCP connection per follower node ----------------------------------------
def open_liveness_listener(host: str) -> socket.socket:
    listener = socket.socket()
    try:
        listener.bind((host, 0))
    except OSError:   # a service name that is not this pod's own address: every interface
        listener.bind(("0.0.0.0", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    return listener


def accept_nodes(listener: socket.socket, nnodes: int, timeout_s: float) -> dict[int, socket.socket]:
    """One connection from each follower node (it sends its node rank as one byte)."""
    nodes, deadline = {}, time.monotonic() + timeout_s
    while len(nodes) < nnodes - 1:
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, nnodes)) - set(nodes))
            raise RendezvousError(f"node(s) {missing} opened no liveness connection within {timeout_s:.0f}s")
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(timeout_s)
        nodes[conn.recv(1)[0]] = conn
    return nodes


def connect_liveness(address: tuple[str, int], node_rank: int) -> socket.socket:
    conn = socket.create_connection(address, timeout=30)
    conn.sendall(bytes([node_rank]))
    conn.settimeout(None)
    return conn


# ---- process group and step messages -------------------------------------------------------
def init_process_group(spec: DistSpec, store, rank: int):
    """The default group (stage-to-stage sends) and the gloo control group (step messages)."""
    import torch.distributed as dist
    dist.init_process_group(spec.data_backend, store=dist.PrefixStore("pg", store), rank=rank,
                            world_size=spec.layout.world,
                            timeout=datetime.timedelta(seconds=spec.collective_timeout_s))
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class ControlChannel:
    """Rank 0 broadcasts each pickled step message; every other rank receives it."""

    def __init__(self, group):
        import torch.distributed as dist
        self._dist, self._group = dist, group
        self._buffer = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
        self.bytes_sent = 0

    def send(self, message) -> None:
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        head = len(payload).to_bytes(8, "little")
        first = CONTROL_BYTES - 8
        self._buffer[:8] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        chunk = payload[:first]
        if chunk:
            self._buffer[8:8 + len(chunk)] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        self._dist.broadcast(self._buffer, 0, group=self._group)
        if len(payload) > first:
            rest = torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8)
            self._dist.broadcast(rest, 0, group=self._group)
        self.bytes_sent += max(CONTROL_BYTES, len(payload) + 8)

    def recv(self):
        self._dist.broadcast(self._buffer, 0, group=self._group)
        raw = self._buffer.numpy()
        length, first = int.from_bytes(raw[:8].tobytes(), "little"), CONTROL_BYTES - 8
        payload = raw[8:8 + min(length, first)].tobytes()
        if length > first:
            rest = torch.empty(length - first, dtype=torch.uint8)
            self._dist.broadcast(rest, 0, group=self._group)
            payload += rest.numpy().tobytes()
        return pickle.loads(payload)
