"""Process helpers shared by tests that start real servers: a free loopback port, waiting
for an HTTP route to answer 200, stopping a process by its PID, and whether `gateway serve`
exists at all. (`gateway serve` itself is started with bench/server_process.py.)"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gateway_serve_available() -> bool:
    """The capability a real-server test uses, asked of the real CLI (not grepped from the
    source): its parser has a `serve` command. A renamed class cannot skip such a test; a
    broken server makes it fail instead."""
    from gateway.cli import build_parser
    try:
        build_parser().parse_args(["serve"])
    except SystemExit:
        return False
    return True
