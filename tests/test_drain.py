"""Graceful drain on SIGTERM (gateway/api/server.py), end to end: a real `gateway serve`
subprocess over the tiny random llama, 16 streams in flight, then SIGTERM.

The model is slowed to at least STEP_S per step by a --model-module that sleeps in forward
(the sleep releases the GIL, like compute does), so a stream of MAX_TOKENS takes at least
MAX_TOKENS * STEP_S seconds on any machine: "longer than the grace" and "still running when
the probes arrive" then hold on a fast box as well as on a loaded one."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from procs import free_port, wait_http

pytestmark = pytest.mark.slow
STREAMS = 16
MAX_TOKENS = 200
STEP_S = 0.03   # >= 6 s per stream
SLOW_MODEL = f"""
import time
from gateway.models.llama import LlamaForCausalLM
from gateway.models.registry import register_model

class SlowLlama(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        time.sleep({STEP_S})
        return super().forward(*args, **kwargs)

register_model("LlamaForCausalLM", SlowLlama)
"""


class Server:
    def __init__(self, model_dir, tmp_path, grace_s: float):
        module = tmp_path / "slow_model.py"
        module.write_text(SLOW_MODEL)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", str(model_dir), "--model-module", str(module),
             "--port", str(self.port), "--num-kv-blocks", "512", "--max-model-len", "512",
             "--shutdown-grace", str(grace_s), "--log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT)
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
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def server_factory(tiny_llama_dir, tmp_path):
    servers = []

    def start(grace_s: float) -> Server:
        servers.append(Server(tiny_llama_dir, tmp_path, grace_s))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


async def _stream(client: httpx.AsyncClient, seen: list, i: int) -> dict:
    body = {"prompt": f"story {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True}
    frames = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                frames.append(data if data == "[DONE]" else orjson.loads(data))
                seen[i] += 1
    return {"frames": frames, "ended": time.monotonic()}


async def _drain_scenario(server: Server, probe: bool):
    """16 streams and one non-streamed request; SIGTERM once every stream has a chunk;
    optional probes during the drain."""
    seen = [0] * STREAMS
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120)) as client:
        tasks = [asyncio.create_task(_stream(client, seen, i)) for i in range(STREAMS)]
        whole = asyncio.create_task(client.post("/v1/completions", json={
            "prompt": "whole", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}))
        while min(seen) < 1 and not any(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        probes = None
        if probe:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as fresh:
                ready = await fresh.get("/ready")
                health = await fresh.get("/health")
                late = await fresh.post("/v1/completions", json={"prompt": "late", "max_tokens": 4})
            probes = {"ready": ready, "health": health, "late": late,
                      "streams_running": sum(not t.done() for t in tasks)}
        results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        probes = {**(probes or {}), "whole": await asyncio.wait_for(whole, 300)}
    return sigterm_at, results, probes


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    proc.wait(timeout=timeout)
    return proc.returncode, time.monotonic()


def test_sigterm_lets_16_streams_finish_then_exits_0(server_factory):
    grace = 120.0
    server = server_factory(grace)
    sigterm_at, results, probes = asyncio.run(_drain_scenario(server, probe=True))
    code, exited_at = _wait_exit(server.proc, 60)

    # While draining: readiness fails at once, liveness does not, new work is turned away.
    assert probes["streams_running"] == STREAMS, "the probes must land while the streams run"
    assert probes["ready"].status_code == 503 and probes["ready"].json()["status"] == "draining"
    assert probes["health"].status_code == 200
    late = probes["late"]
    assert late.status_code == 503 and late.headers.get("retry-after") == "1", late.text
    assert late.json()["error"]["code"] == "server_shutting_down"
    whole = probes["whole"]
    assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "length"

    for result in results:
        frames = result["frames"]
        assert frames[-1] == "[DONE]"
        assert frames[-2]["choices"][0]["finish_reason"] == "length", frames[-2]
        assert not any("error" in f for f in frames[:-1])
        assert result["ended"] - sigterm_at < grace
    assert code == 0, server.output()[-3000:]
    assert exited_at - max(r["ended"] for r in results) < 30
    assert "draining" in server.output()


def test_grace_shorter_than_the_streams_ends_each_with_an_error_event_and_done(server_factory):
    grace = 1.0
    server = server_factory(grace)
    sigterm_at, results, probes = asyncio.run(_drain_scenario(server, probe=False))
    code, exited_at = _wait_exit(server.proc, 60)
    whole = probes["whole"]   # the non-streamed request: an error body instead of a cut connection
    assert whole.status_code == 503 and whole.headers.get("retry-after") == "1"
    assert whole.json()["error"]["code"] == "server_shutting_down"
    for result in results:
        frames = result["frames"]
        assert frames[-1] == "[DONE]"
        error = frames[-2]["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "ServiceUnavailableError"
        texts = [f for f in frames[:-2] if f["choices"][0]["text"]]
        assert 0 < len(texts) < MAX_TOKENS
        assert result["ended"] - sigterm_at < grace + 15   # a loaded box: generous
    assert code == 0, server.output()[-3000:]
    assert exited_at - sigterm_at < grace + 30
    assert "shutdown grace of 1 s over: ending 17 request(s)" in server.output()


def test_a_second_signal_exits_at_once(server_factory):
    server = server_factory(120.0)

    async def scenario():
        seen = [0]
        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(120)) as client:
            task = asyncio.create_task(_stream(client, seen, 0))
            while seen[0] < 1 and not task.done():
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert server.proc.poll() is None, "the first signal only drains"
            server.proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            await asyncio.gather(task, return_exceptions=True)
            return start
    start = asyncio.run(scenario())
    code, exited_at = _wait_exit(server.proc, 30)
    assert code == 128 + signal.SIGINT, server.output()[-3000:]
    assert exited_at - start < 10   # the stream had seconds left; nobody waited for it
