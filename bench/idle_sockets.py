"""Idle sockets and slowloris clients against a live gateway: how much they delay a normal
request, and whether the server closes them.

    python bench/idle_sockets.py                               # default model, 2,000 idle sockets
    python bench/idle_sockets.py --model DIR --header-timeout 2 --fd-limit 1024
    python bench/idle_sockets.py --url http://127.0.0.1:8000   # an existing server

Order: start `gateway serve` (unless --url; --fd-limit N sets the server's RLIMIT_NOFILE to N/N
right after the spawn, as a container with a 1,024 hard limit would) → time --requests GET
/v1/models on fresh connections (the baseline) → open --idle sockets that send nothing and
--slowloris sockets that send a request head one header line every --trickle-s seconds →
time one request right behind them in the accept queue (printed, not judged: accepting a burst
of 2,000 connections takes the loop a few hundred ms) → after SETTLE_S, time requests back to
back until --header-timeout + 2 s, which spans the held state and the moment the server closes
them all → count how many of the held sockets the server closed → stop the server by PID.

Prints one line per phase (p50 / p99 / max in ms) and the delay: the worst request while the
sockets are held minus the baseline median. Exit status 1 when that delay exceeds --max-delay-ms
(100), a request failed, or a held socket is still open after the header timeout."""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_process import ServerProcess  # noqa: E402

SETTLE_S = 1.0   # after the burst of connects, before the held-sockets phase is timed
SLOW_MS = 50     # requests slower than this are listed with their time since the sockets opened


def get_models(host: str, port: int) -> bool:
    """GET /v1/models on a fresh connection, read to the end; True on a 200."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    return response.startswith(b"HTTP/1.1 200")


def timed_requests(host: str, port: int, count: int, pause_s: float = 0.02) -> tuple[list[float], int]:
    """Latencies (ms) of `count` GETs, each on a fresh connection; and how many failed."""
    latencies, failures = [], 0
    for _ in range(count):
        start = time.perf_counter()
        try:
            ok = get_models(host, port)
        except OSError:
            ok = False
        latencies.append((time.perf_counter() - start) * 1000)
        failures += not ok
        time.sleep(pause_s)
    return latencies, failures


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"p50 {statistics.median(ordered):.1f} / p99 {p99:.1f} / max {ordered[-1]:.1f} ms"


def open_idle(host: str, port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=10)
        s.setblocking(False)
        socks.append(s)
    return socks


class Slowloris:
    """Sockets that send a request head one header line every trickle_s seconds, forever."""

    def __init__(self, host: str, port: int, count: int, trickle_s: float):
        self.socks = open_idle(host, port, count)
        self.trickle_s = trickle_s
        self.stop = threading.Event()
        for s in self.socks:
            try:
                s.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            except OSError:   # already closed by the server (evicted at its connection cap)
                pass
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.wait(self.trickle_s):
            n += 1
            for s in self.socks:
                try:
                    s.send(b"X-Slow-%d: 1\r\n" % n)
                except OSError:   # closed by the server: what we want to see
                    pass


def closed_by_server(s: socket.socket) -> bool:
    """EOF or a reset (anything the server answered first is read and dropped)."""
    try:
        while s.recv(65536):
            pass
        return True
    except BlockingIOError:   # still open, nothing to read
        return False
    except OSError:
        return True


def count_closed(socks: list[socket.socket]) -> int:
    return sum(closed_by_server(s) for s in socks)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an existing server (not started or stopped)")
    p.add_argument("--model", default=None, help="model for the started server (default: the default model)")
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--slowloris", type=int, default=10)
    p.add_argument("--trickle-s", type=float, default=0.5)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--header-timeout", type=float, default=None, help="passed to the started server")
    p.add_argument("--fd-limit", type=int, default=None, help="the started server's RLIMIT_NOFILE (soft = hard)")
    p.add_argument("--max-delay-ms", type=float, default=100.0)
    return p.parse_args(argv)


def timed_until(host: str, port: int, deadline: float, t0: float) -> tuple[list[float], int, list[str]]:
    """Requests back to back until deadline; also 'ms at +s' for each one over SLOW_MS."""
    latencies, failures, slow = [], 0, []
    while (start := time.perf_counter()) < deadline:
        more, failed = timed_requests(host, port, 1)
        latencies += more
        failures += failed
        if more[0] > SLOW_MS:
            slow.append(f"{more[0]:.0f} ms at +{start - t0:.2f} s")
    return latencies, failures, slow


def run(args: argparse.Namespace, url: str, header_timeout: float) -> bool:
    host, port = url.split("//")[1].rsplit(":", 1)
    port = int(port)
    base, failures = timed_requests(host, port, args.requests)
    print(f"baseline, {args.requests} requests: {summary(base)}", flush=True)
    t0 = time.perf_counter()
    idle = open_idle(host, port, args.idle)
    slow = Slowloris(host, port, args.slowloris, args.trickle_s)
    opened_s = time.perf_counter() - t0
    burst, failed = timed_requests(host, port, 1)
    failures += failed
    print(f"opened {args.idle} idle + {args.slowloris} slowloris sockets in {opened_s:.2f} s; the request "
          f"right behind them in the accept queue: {burst[0]:.1f} ms (not judged: a connection burst)", flush=True)
    time.sleep(SETTLE_S)
    # From the settled state through the moment the header timeout closes them all at once.
    held, failed, slow_ones = timed_until(host, port, max(t0 + header_timeout + 2, time.perf_counter() + 2), t0)
    failures += failed
    delay = max(held) - statistics.median(base)
    print(f"held, then closed by the server, {len(held)} requests: {summary(held)}; delay {delay:.1f} ms "
          f"(worst minus baseline median); failed {failures}; over {SLOW_MS} ms: {slow_ones or 'none'}",
          flush=True)
    time.sleep(max(0.0, header_timeout + 3 - (time.perf_counter() - t0)))
    closed_idle, closed_slow = count_closed(idle), count_closed(slow.socks)
    slow.stop.set()
    print(f"after {header_timeout:g} s + 3 s: server closed {closed_idle}/{args.idle} idle and "
          f"{closed_slow}/{args.slowloris} slowloris sockets", flush=True)
    for s in idle + slow.socks:
        s.close()
    return (delay <= args.max_delay_ms and failures == 0
            and closed_idle == args.idle and closed_slow == args.slowloris)


def main(argv=None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # our own sockets need descriptors too
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.url:
        return 0 if run(args, args.url.rstrip("/"), args.header_timeout or 10.0) else 1
    server_args = ([args.model] if args.model else []) + ["--num-kv-blocks", "256", "--log-level", "warning"]
    if args.header_timeout is not None:
        server_args += ["--header-timeout", str(args.header_timeout)]
    server = ServerProcess(server_args)
    if args.fd_limit is not None:   # lands long before the server's start-up code runs
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit))
    with server:
        ok = run(args, server.url, args.header_timeout or 10.0)
        print("server log tail:\n" + server.tail(1500) if not ok else "", end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
