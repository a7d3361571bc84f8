"""`serve(config) -> int`: the `gateway serve` command.

Order of side effects: configure logging and the GIL switch interval → raise the open-file
limit to its hard limit → load the model (AsyncEngine.from_config, blocking; its step listener
forwards to the metrics created right after, because the metrics are labelled with the served
model name the engine derives) → create ServerMetrics → build the app → freeze what the load
left for the garbage collector (gc.freeze: a full collection took 200-260 ms) → run uvicorn (one
worker, asyncio loop, httptools when installed else h11, access log off, the connection rules
of api/connections.py). uvicorn's lifespan starts the engine loop inside its event loop; after
the socket is bound we log the URL and the served model name. Returns the process exit code.

SIGTERM or SIGINT drains (Kubernetes sends SIGTERM on every rollout, after the chart's preStop
sleep): the listener stays open, but /ready fails at once and new generation requests get 503
with Retry-After (engine.draining, read by app.py); requests in progress get --shutdown-grace
seconds. Once none is left, or at the deadline, the rest end through the engine's fail path
(engine.fail_in_flight: an SSE error frame and `data: [DONE]`, or a 503 JSON body; each
abort frees its KV blocks), uvicorn shuts down (AFTER_DRAIN_S for their last frames), the
lifespan stops the engine and serve() returns 0. A second signal exits at once (128 + signal).

After an engine crash the server does not linger. The loop thread logs the traceback and
fails every in-flight request at once (503, or an error frame on a stream); new requests
get 503 and /health and /ready report 503. Within one uvicorn tick (0.1 s) _Server notices
the dead engine, stops accepting connections, lets the in-flight answers drain (graceful
shutdown, at most GRACEFUL_SHUTDOWN_S) and serve() returns EXIT_ENGINE_DEAD, so that the
orchestrator (Kubernetes, systemd, docker --restart) restarts a fresh process: a dead loop
never recovers, and staying up would only turn traffic away until a liveness probe noticed."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import resource
import sys
import time

import uvicorn

from gateway.api.app import build_app
from gateway.api.connections import (AcceptErrorThrottle, ConnectionGuard, connection_budget,
                                     guarded_protocol, raise_fd_limit)
from gateway.api.errors import RETRY_AFTER_SECONDS, APIError
from gateway.config import Config

log = logging.getLogger("gateway.api")
GRACEFUL_SHUTDOWN_S = 10   # after an engine crash, answers in progress get this long
AFTER_DRAIN_S = 3          # after the drain, the ended requests' last frames get this long
EXIT_ENGINE_DEAD = 3       # the exit code after an engine crash


class _StepForwarder:
    """The engine's step listener; forwards to the metrics once they exist."""

    def __init__(self) -> None:
        self.target = None

    def __call__(self, stats) -> None:
        if self.target is not None:
            self.target.on_step(stats)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str, engine, shutdown_grace_s: float = 0.0,
                 guard: ConnectionGuard | None = None):
        super().__init__(config)
        self.url, self.engine, self.model_name = url, engine, engine.model_name
        self.shutdown_grace_s, self.guard = shutdown_grace_s, guard
        self.engine_died = False
        self.drain_deadline: float | None = None   # monotonic; set by the first SIGTERM/SIGINT
        self.forced_by: int | None = None          # the signal that cut the drain short
        self.drain_logged = False

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AcceptErrorThrottle(loop))
        await super().startup(sockets)
        if self.started:
            log.info("gateway serving model %r at %s (OpenAI base URL %s/v1)", self.model_name, self.url, self.url)

    def handle_exit(self, sig: int, frame) -> None:
        """A signal handler (main thread): only flags here, on_tick acts on them. uvicorn's own
        handler is not called: it would re-raise the signal after shutdown (exit -15, not 0)."""
        if self.drain_deadline is None and self.started and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.shutdown_grace_s
            self.engine.draining = True   # /ready fails and new requests get 503 from now on
            return
        if self.drain_deadline is not None or self.should_exit:
            self.forced_by, self.force_exit = sig, True   # a second signal: no more waiting
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.started and not self.engine_died and not self.engine.is_alive:
            self.engine_died = True
            log.critical("the engine loop died (traceback above); shutting down with exit code %d "
                         "so that the server is restarted", EXIT_ENGINE_DEAD)
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            self._drain_step(counter)
        return await super().on_tick(counter)

    def _drain_step(self, counter: int) -> None:
        """While draining: exit once no request is in progress; at the deadline end the rest."""
        busy = len(self.server_state.tasks)
        if not self.drain_logged or counter % 50 == 0 or busy == 0:
            self.drain_logged = True
            log.info("draining: %d request(s) in progress, %.1f s of grace left", busy,
                     max(0.0, self.drain_deadline - time.monotonic()))
        if busy and time.monotonic() < self.drain_deadline:
            return
        if busy:
            ended = self.engine.fail_in_flight(_shutdown_error)
            log.warning("shutdown grace of %g s over: ending %d request(s) with an error",
                        self.shutdown_grace_s, ended)
        # What is left (the failed streams' last frames) gets a short while, then uvicorn cancels it.
        self.config.timeout_graceful_shutdown = AFTER_DRAIN_S
        self.should_exit = True

    @property
    def exit_code(self) -> int:
        if self.engine_died:
            return EXIT_ENGINE_DEAD
        if self.forced_by is not None:
            return 128 + self.forced_by
        return 0 if self.started else 1


def _shutdown_error() -> APIError:
    return APIError(503, "The server shut down before the request finished; retry it.",
                    code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_SECONDS})


def _http_protocol() -> type:
    """uvicorn's httptools protocol when httptools is installed, else its h11 one."""
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol
    return H11Protocol


def _uvicorn_config(app, config: Config, guard: ConnectionGuard, backlog: int) -> uvicorn.Config:
    base = _http_protocol()
    return uvicorn.Config(app, host=config.host, port=config.port, loop="asyncio",
                          http=guarded_protocol(base, guard), workers=1, access_log=False,
                          log_level=config.log_level, lifespan="on", backlog=backlog,
                          timeout_keep_alive=config.keep_alive_timeout_s,
                          h11_max_incomplete_event_size=config.max_header_bytes,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def build_server(config: Config, engine, metrics=None) -> _Server:
    """The uvicorn server around build_app(engine, ...); run() it (tests run it in a thread)."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    cap, backlog = connection_budget(config.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    guard = ConnectionGuard(cap, config.header_timeout_s, config.max_header_bytes)
    return _Server(_uvicorn_config(build_app(engine, config, metrics), config, guard, backlog),
                   f"http://{host}:{config.port}", engine, config.shutdown_grace_s, guard)


# The engine thread needs the GIL back after every torch op; while the event loop runs Python
# it waits up to the switch interval (5 ms by default) each time. 0.5 ms cut single-stream
# time to first token from 124 to 103 ms and the prefill step from 122 to 98 ms.
GIL_SWITCH_INTERVAL_S = 0.0005


def serve(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    soft, hard = raise_fd_limit()
    log.info("open-file limit %d (hard %s)", soft, hard)
    from gateway.engine.async_engine import AsyncEngine   # heavy: torch, transformers
    from gateway.metrics import ServerMetrics

    forwarder = _StepForwarder()
    engine = AsyncEngine.from_config(config, step_listener=forwarder)
    metrics = ServerMetrics(engine.model_name, compat_vllm=config.metrics_compat == "vllm",
                            max_model_len=engine.max_model_len)
    forwarder.target = metrics
    server = build_server(config, engine, metrics)
    # The model, torch and transformers leave ~300k objects that a full collection walks: 200-260 ms
    # with every request and stream stopped (measured with the default model). Frozen, they are
    # never scanned again; collections then see only what serving allocates.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    except SystemExit as exc:   # uvicorn exits this way when it cannot bind the port
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if not server.started:   # the lifespan never ran its shutdown: free workers ourselves
            _shutdown_quietly(engine)
    return server.exit_code


def _shutdown_quietly(engine) -> None:
    try:
        asyncio.run(engine.shutdown())
    except Exception:
        log.warning("engine shutdown after a failed start raised", exc_info=True)
