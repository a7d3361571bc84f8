"""`EngineThread`: the one thread that builds the EngineCore (loads the model) and then runs
the engine loop (see async_engine.py for why one thread does both).

Order: EngineThread(build) starts the thread, which runs build() at once (wait_built()
returns its result or re-raises) → run_next(fn) hands it the one function it runs next."""

from __future__ import annotations

import threading
from collections.abc import Callable

from gateway.engine.core import EngineCore


class EngineThread(threading.Thread):
    """A daemon thread that runs build() at once (wait_built() returns its result or re-raises),
    then the one function run_next() hands it: the model's loader is the loop's thread."""

    def __init__(self, build: Callable[[], EngineCore] | None):
        super().__init__(name="gateway-engine", daemon=True)
        self._build = build
        self._built = threading.Event()
        self._next: Callable[[], None] | None = None
        self._go = threading.Event()
        self._result: EngineCore | None = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._build() if self._build is not None else None
        except BaseException as exc:
            self._error = exc
        self._built.set()
        if self._error is None:
            self._go.wait()
            self._next()

    def wait_built(self) -> EngineCore:
        self._built.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def run_next(self, fn: Callable[[], None]) -> None:
        self._next = fn
        self._go.set()
