"""Connection hygiene for the uvicorn server: bounded connections, a header-read timeout,
the file-descriptor limit, and accept errors logged once per interval.

Owns:
- `raise_fd_limit()`: RLIMIT_NOFILE soft → hard at start-up (containers often start at 1024).
- `connection_budget(max_connections, fd_soft)`: the connection cap and listen backlog that fit
  the descriptors; asyncio accepts up to `backlog` sockets in one loop turn before any
  connection_made runs, so the cap leaves that many (plus a reserve for model files, pipes,
  shared memory) below the limit, and accept() never reaches EMFILE.
- `ConnectionGuard` + `guarded_protocol(base)`: a subclass of uvicorn's HTTP protocol that
  (1) closes a connection whose request head has not arrived within `header_timeout_s` of its
  opening (or of the first byte after a keep-alive pause): idle sockets and slowloris clients;
  uvicorn's own keep-alive timer only starts after a response and is cancelled by any byte;
  (2) answers 431 and closes when a request head exceeds `max_header_bytes`; (3) at the cap,
  closes the connection idle the longest (no request in progress) to admit the new one, so a
  flood of idle sockets cannot lock real clients out; only when every connection is busy is
  the new one answered 503. uvicorn's `limit_concurrency` is not used: it counts idle
  connections too and answers the real request 503, which is what an idle flood wants.
- `AcceptErrorThrottle`: the event loop's exception handler; asyncio reports every failed
  accept() (EMFILE/ENFILE...) with a traceback, this logs one line per interval with a count.
Side effects: setrlimit in raise_fd_limit; closing transports; logging."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict, deque

log = logging.getLogger("gateway.api")
FD_RESERVE = 128          # descriptors kept for everything but client sockets
DEFAULT_BACKLOG = 2048    # uvicorn's default listen backlog
ACCEPT_LOG_INTERVAL_S = 10.0
CLOSE_BATCH = 16          # timed-out connections closed per event-loop turn
_BUSY_BODY = (b'{"error":{"message":"Too many connections; retry later.","type":"ServiceUnavailableError",'
              b'"param":null,"code":"too_many_connections"}}')
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
_TOO_LARGE_RESPONSE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
                       b"content-length: 0\r\n\r\n")


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit where the OS allows; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:   # e.g. hard=infinity refused by the kernel
            log.warning("could not raise the open-file limit from %d to %s: %s", soft, hard, exc)
    return soft, hard


def connection_budget(max_connections: int, fd_soft: int) -> tuple[int, int]:
    """(connection cap, listen backlog) that fit in fd_soft descriptors."""
    if fd_soft == resource.RLIM_INFINITY:
        return max_connections, DEFAULT_BACKLOG
    available = max(32, fd_soft - FD_RESERVE)
    backlog = max(8, min(DEFAULT_BACKLOG, available // 4))
    cap = max(8, min(max_connections, available - backlog))
    if cap < max_connections:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", max_connections, cap, fd_soft)
    return cap, backlog


class AcceptErrorThrottle:
    """Loop exception handler: failed accept() calls become one warning per interval."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = ACCEPT_LOG_INTERVAL_S):
        self.loop, self.interval_s = loop, interval_s
        self.suppressed = 0
        self.last_logged: float | None = None

    def __call__(self, loop, context: dict) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if self.last_logged is not None and now - self.last_logged < self.interval_s:
            self.suppressed += 1
            return
        log.warning("accept() failed: %s (%d more since the last report); raise the open-file limit "
                    "or lower --max-connections", context.get("exception"), self.suppressed)
        self.last_logged, self.suppressed = now, 0


class ConnectionGuard:
    """Shared by every connection of one server: the cap and the idle connections, oldest first."""

    def __init__(self, max_connections: int, header_timeout_s: float, max_header_bytes: int):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.idle: OrderedDict = OrderedDict()   # protocol → None, in the order they went idle
        self.evicted = 0
        self._expired: deque = deque()   # head timeouts not yet closed
        self._sweeping = False

    def expire(self, conn) -> None:
        """Close conn soon, at most CLOSE_BATCH per loop turn: 2,000 sockets opened together
        time out together, and closing them in one turn held a normal request up 150 ms."""
        self._expired.append(conn)
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_soon(self._sweep)

    def _sweep(self) -> None:
        for _ in range(min(CLOSE_BATCH, len(self._expired))):
            conn = self._expired.popleft()
            if not conn.transport.is_closing() and not conn._busy():
                conn.transport.abort()
        if self._expired:
            asyncio.get_running_loop().call_soon(self._sweep)   # after the next poll for I/O
        else:
            self._sweeping = False

    def admit(self, conn, connections: set) -> bool:
        """False when the new connection must be refused (every other one is busy)."""
        while len(connections) > self.max_connections:
            victim = next((c for c in self.idle if c is not conn), None)
            if victim is None:
                return False
            self.idle.pop(victim)
            connections.discard(victim)   # uvicorn's set: the count drops now, not a turn later
            victim.transport.abort()
            self.evicted += 1
        return True


def guarded_protocol(base: type, guard: ConnectionGuard) -> type:
    """`base` (uvicorn's H11Protocol or HttpToolsProtocol) with the guard's rules."""

    class GuardedProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes, self._head_tail = 0, b""   # the request head read so far
            if not guard.admit(self, self.connections):
                self.connections.discard(self)
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            self._went_idle()

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _went_idle(self) -> None:
            guard.idle[self] = None
            guard.idle.move_to_end(self)
            self._head_bytes, self._head_tail = 0, b""
            if self.timeout_keep_alive_task is None:   # fresh connection: nothing else limits it
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(guard.header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._busy() and not self.transport.is_closing():
                log.debug("closing %s: no request head within %g s", self.client, guard.header_timeout_s)
                guard.expire(self)

        def data_received(self, data: bytes) -> None:
            if not self._busy():
                if self._head_too_large(data):
                    self.transport.write(_TOO_LARGE_RESPONSE)
                    self.transport.close()
                    return
                self._arm_head_timer()   # the first byte after a keep-alive pause starts the clock
            super().data_received(data)
            if self._busy():
                guard.idle.pop(self, None)
                self._disarm_head_timer()
                self._head_bytes, self._head_tail = 0, b""

        def _head_too_large(self, data: bytes) -> bool:
            """Counts the head up to its blank line, across reads; a whole head in one read
            counts too (h11's own limit only sees heads still incomplete)."""
            window = self._head_tail + data
            end = window.find(b"\r\n\r\n")
            size = self._head_bytes + (end + 4 - len(self._head_tail) if end >= 0 else len(data))
            self._head_bytes += len(data)
            self._head_tail = window[-3:]
            return size > guard.max_header_bytes

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():
                self._went_idle()

        def connection_lost(self, exc) -> None:
            guard.idle.pop(self, None)
            if hasattr(self, "_head_timer"):
                self._disarm_head_timer()
            super().connection_lost(exc)

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
