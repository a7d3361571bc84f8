"""In-process gateway servers for tests: a real AsyncEngine (usually over a tiny random-weight
model) behind the uvicorn server that `gateway serve` builds (server.build_server), run in a
daemon thread on a free loopback port. Starting one takes a second or two, so a test can own
a server it is about to break.

`StepGate` wraps the engine core's step() in place: pause() holds the engine thread before its
next step (requests pile up, admitted but unserved, so in-flight counts are exact), resume()
releases it, crash_in(n) makes the n-th following step raise, as a bug in the loop would.
`stream()` reads one SSE response into parsed frames; `run()` runs a coroutine with a limit."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import orjson

from procs import free_port
from gateway.api.server import build_server
from gateway.config import Config
from gateway.engine.async_engine import AsyncEngine

START_TIMEOUT_S = 120


class InjectedCrash(RuntimeError):
    pass


class StepGate:
    def __init__(self, core):
        self._step = core.step
        self._open = threading.Event()
        self._open.set()
        self._crash_in: int | None = None
        core.step = self.step

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def crash_in(self, steps: int) -> None:
        self._crash_in = steps

    def step(self):
        self._open.wait()
        if self._crash_in is not None:
            self._crash_in -= 1
            if self._crash_in <= 0:
                raise InjectedCrash("injected engine crash")
        return self._step()


class LiveServer:
    """`with LiveServer(model=..., **config) as live:` → live.url, live.engine, live.gate, live.app."""

    def __init__(self, **config):
        self.config = Config(host="127.0.0.1", port=free_port(), log_level="warning", **config)
        self.engine = AsyncEngine.from_config(self.config)
        self.gate = StepGate(self.engine.core)
        self.server = build_server(self.config, self.engine)
        self.app = self.server.config.app
        self.url = f"http://127.0.0.1:{self.config.port}"
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.server.started and self.engine.is_ready()):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.gate.resume()
        self.server.should_exit = True
        self.thread.join(30)

    def blocks_in_use(self, settle_s: float = 10.0) -> int | None:
        """kv_blocks_in_use from /ready, polled until it is 0 or settle_s passes (aborts and
        finishes are processed by the engine thread, a moment after the client sees the end)."""
        deadline = time.monotonic() + settle_s
        while True:
            in_use = httpx.get(self.url + "/ready", timeout=10).json()["kv_blocks_in_use"]
            if in_use == 0 or time.monotonic() > deadline:
                return in_use
            time.sleep(0.05)


async def stream(client, path: str, body: dict, opened: asyncio.Event | None = None,
                 first_token: asyncio.Event | None = None, headers=None) -> tuple[int, list]:
    """(status, frames): frames are parsed JSON objects, then "[DONE]"; the events are set when
    the headers arrive and when the first frame with generated text arrives."""
    async with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as response:
        if opened is not None:
            opened.set()
        if response.status_code != 200:
            return response.status_code, [orjson.loads(await response.aread())]
        frames = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                frames.append(data if data == "[DONE]" else orjson.loads(data))
                if first_token is not None and isinstance(frames[-1], dict) and any(
                        c.get("text") for c in frames[-1].get("choices", [])):
                    first_token.set()
        return 200, frames


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))
