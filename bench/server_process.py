"""`gateway serve` in a subprocess, the one helper the bench scripts (soak.py, latency.py,
kv_pressure.py) and the tests (through tests/conftest.py's path entry) start servers with:
a free loopback port, output to a temporary log, /ready polled until it answers 200,
stopped by its PID.

Order: ServerProcess(args) picks the port and starts the process → wait_ready() (returns
the /ready body; raises with the log's tail if the process exits or is not ready within
start_timeout_s) → stop(): SIGTERM, SIGKILL after stop_timeout_s, then the log is deleted.
`with ServerProcess(args) as server:` waits for readiness on entry and stops on exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class ServerProcess:
    def __init__(self, args: list[str], start_timeout_s: float = 900, announce: bool = False,
                 stop_timeout_s: float = 60):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="gateway-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        if announce:
            print("server:", " ".join(cmd[2:]), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        """The /ready body once it answers 200 (worker_pids, kv_blocks_in_use, ...)."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                response = httpx.get(self.url + "/ready", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready after {timeout_s} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Idempotent; also for a server that already exited (its log still goes)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
