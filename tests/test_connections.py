"""Connection hygiene (gateway/api/connections.py): real `gateway serve` subprocesses over the
tiny random llama, started with a lowered open-file limit, then idle sockets, a slowloris
client, keep-alive, an oversized head and an idle flood at the descriptor limit.

Latency bounds here are loose (1-2 s, for a loaded 2-core box); bench/idle_sockets.py measures
the real figures (2,000 idle sockets: worst request a few ms to tens of ms over the baseline)."""

from __future__ import annotations

import logging
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from procs import free_port, wait_http
from gateway.api.connections import AcceptErrorThrottle, connection_budget

HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


class Server:
    def __init__(self, model_dir, log_path, fd_soft: int, fd_hard: int, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")

        def limit_fds():   # in the child, before exec: what a container's limits would be
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_soft, fd_hard))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", str(model_dir), "--port", str(self.port),
             "--num-kv-blocks", "64", "--max-model-len", "256", "--header-timeout", str(HEADER_TIMEOUT_S),
             "--keep-alive-timeout", str(KEEP_ALIVE_S), *args],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit_fds)
        try:
            wait_http(self.url + "/ready", self.proc, timeout=300)
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """Soft limit 512 below a higher hard limit: start-up must raise it."""
    s = Server(tiny_llama_dir, tmp_path_factory.mktemp("conn") / "server.log", min(512, HARD), HARD)
    yield s
    s.close()


def get_models(port: int) -> tuple[bool, float]:
    """(200?, seconds) for GET /v1/models on a fresh connection."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    return response.startswith(b"HTTP/1.1 200"), time.monotonic() - start


def open_idle(port: int, count: int) -> list[socket.socket]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(count)]
    for s in socks:
        s.setblocking(False)
    return socks


def closed_by_server(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:   # reset
        return True


@pytest.mark.skipif(HARD <= 512 or HARD == resource.RLIM_INFINITY, reason="needs a hard limit above 512")
def test_start_up_raises_the_open_file_limit_to_the_hard_limit(server):
    limits = open(f"/proc/{server.proc.pid}/limits").read()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert int(soft) == int(hard) == HARD, line


def test_idle_sockets_and_a_slowloris_are_closed_and_requests_stay_fast(server):
    opened = time.monotonic()
    idle = open_idle(server.port, 300)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n")
    stop = threading.Event()

    def trickle():   # one header line every 0.2 s: each byte would reset a per-read timer
        n = 0
        while not stop.wait(0.2):
            n += 1
            try:
                slow.sendall(b"X-Slow-%d: 1\r\n" % n)
            except OSError:
                return
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        results = [get_models(server.port) for _ in range(10)]
        assert all(ok for ok, _ in results)
        assert max(t for _, t in results) < 1.0, results
        assert not any(closed_by_server(s) for s in idle[:20]), "closed before the header timeout"
        time.sleep(max(0.0, opened + HEADER_TIMEOUT_S + 3 - time.monotonic()))
        assert sum(closed_by_server(s) for s in idle) == len(idle)
        slow.setblocking(False)
        assert closed_by_server(slow), "the slowloris kept its connection by trickling"
        assert get_models(server.port)[0]
    finally:
        stop.set()
        for s in idle + [slow]:
            s.close()


def test_keep_alive_connection_is_closed_after_the_keep_alive_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        s.setblocking(False)
        time.sleep(KEEP_ALIVE_S / 4)
        assert not closed_by_server(s)
        time.sleep(KEEP_ALIVE_S + 2)
        assert closed_by_server(s)


def test_an_oversized_request_head_is_refused_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        answer = s.recv(65536)
    assert answer.split(b" ")[1] in (b"400", b"431"), answer[:200]
    assert get_models(server.port)[0]


def test_at_a_low_descriptor_limit_an_idle_flood_cannot_lock_requests_out(tiny_llama_dir, tmp_path):
    # Hard limit 256 (unraisable): before, 300 idle sockets exhausted the descriptors, accept()
    # failed (EMFILE) on every try and normal requests timed out while they were held.
    server = Server(tiny_llama_dir, tmp_path / "server.log", 256, 256, "--max-connections", "4096")
    idle = []
    try:
        idle = open_idle(server.port, 300)
        time.sleep(0.5)
        results = [get_models(server.port) for _ in range(10)]
        assert all(ok for ok, _ in results), server.output()[-2000:]
        assert max(t for _, t in results) < 2.0, results
        assert sum(closed_by_server(s) for s in idle) >= 300 - 256   # the oldest idle ones made room
        out = server.output()
        assert "--max-connections 4096 lowered to" in out
        assert out.count("accept() failed") <= 3 and "Traceback" not in out
    finally:
        for s in idle:
            s.close()
        server.close()


def test_accept_errors_are_logged_once_per_interval(caplog):
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        throttle = AcceptErrorThrottle(loop, interval_s=0.5)
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.WARNING, logger="gateway.api"):
            for _ in range(1000):
                throttle(loop, context)
            time.sleep(0.6)
            throttle(loop, context)
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(lines) == 2 and "(999 more since the last report)" in lines[1], lines


def test_connection_budget_leaves_descriptors_for_the_accept_batch():
    assert connection_budget(4096, 20000) == (4096, 2048)
    cap, backlog = connection_budget(4096, 1024)
    assert cap + backlog <= 1024 - 128 and cap >= 512
