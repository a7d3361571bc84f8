"""Engine outputs → per-choice deltas: `Job`, the n engine requests behind one HTTP request,
and `SSEResponse`, the pure ASGI response that streams frames.

`Job` is the requests' OutputSink: the engine's event-loop callback appends each output to
the job's one list and wakes its reader (the one hop a token makes; no queue or task per
choice). `next()` takes everything pending at once and merges it per choice into one Delta,
so a reader that fell behind (a slow client) gets one delta, one SSE event per choice, for
all the tokens that piled up instead of one event per token.

Order of side effects: Job.start() submits every choice in one engine.submit (refusals are
raised right there, before anything streams: queue full, engine dead, context exceeded) and
arms the deadline timer (--request-timeout / X-Request-Timeout; on expiry next() raises a 408
APIError) → next() ... → close(): engine.abort() for every unfinished choice, one metrics
record per choice. `SSEResponse` closes its frame generator on every exit path, client
disconnect included (Starlette's StreamingResponse leaves it suspended when the cancellation
lands in `send`)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable

from gateway.api.errors import APIError
from gateway.engine.client import EngineClient
from gateway.engine.errors import QueueFullError, RequestRejectedError
from gateway.engine.messages import EngineRequest, RequestOutput, RequestRecord
from gateway.sampling.logprobs import TokenLogprob

log = logging.getLogger("gateway.api")
# Refused at admission (429 queue full, 400 rejected by the engine's checks): recorded under
# finish reason "rejected", not as an error or abort of work the engine did.
REFUSALS = (QueueFullError, RequestRejectedError)
_DEADLINE = object()   # appended by the deadline timer in place of an output
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]   # keep reverse proxies from buffering the stream


@dataclass
class ChoiceState:
    index: int
    request: EngineRequest
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    num_cached_tokens: int = 0            # prefix-cache hit of the prompt, from the first output
    embedding: list[float] | None = None  # an embedding request's vector, from its last output
    token_times: list[float] = field(default_factory=list)
    first_scheduled_time: float | None = None
    finish_reason: str | None = None      # stop | length | abort | error | rejected

    def update(self, out: RequestOutput, now: float) -> None:
        self.num_tokens += len(out.new_token_ids)
        self.token_times.extend([now] * len(out.new_token_ids))
        self.text.append(out.new_text)
        self.logprobs.extend(out.logprobs or ())
        if self.first_scheduled_time is None:
            self.first_scheduled_time = out.first_scheduled_time
            self.num_cached_tokens = out.num_cached_tokens
        if out.embedding is not None:
            self.embedding = out.embedding
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            if self.finish_reason == "error":   # out.error is written for the client (core.py logs the cause)
                # 422, not 500: the fault belongs to this request alone (its sampling values, its
                # tokens), the engine and every other request go on, and a retry would fail again
                raise APIError(422, f"generation failed for this request: {out.error or 'engine error'}",
                               code="request_failed")
            if self.finish_reason == "abort":   # we did not ask for it: the engine is going away
                raise APIError(503, "the engine aborted the request", code="engine_abort")


@dataclass
class Delta:
    """What one choice gained since the reader last looked (one or more engine outputs)."""
    state: ChoiceState
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False


class Job:
    """The engine requests of one HTTP request, merged into one stream of deltas."""

    def __init__(self, engine: EngineClient, requests: list[EngineRequest], metrics=None,
                 arrival_time: float | None = None, n: int = 1, max_tokens: int | None = None,
                 timeout: float | None = None):
        self.engine, self.metrics, self.n = engine, metrics, n
        self.timeout = timeout         # seconds from arrival_time; None: no deadline
        self._timer: asyncio.TimerHandle | None = None
        self.max_tokens = max_tokens   # as the client asked: None when left to the context
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.states = [ChoiceState(i, r) for i, r in enumerate(requests)]
        self._by_id = {s.request.request_id: s for s in self.states}
        self._pending: list[tuple[ChoiceState | None, object]] = []   # outputs, errors, _DEADLINE
        self._waiter: asyncio.Future | None = None
        self._open = len(self.states)   # choices whose last output has not been read
        self._error: BaseException | None = None   # raised by next() once the deltas before it are out
        self._closed = False

    def start(self) -> None:
        """Submit every choice; a refusal raises here (the states say why: rejected or error)."""
        try:
            self.engine.submit([s.request for s in self.states], self)
        except BaseException as exc:
            for s in self.states:
                s.finish_reason = "rejected" if isinstance(exc, REFUSALS) else "error"
            raise
        if self.timeout is not None:
            delay = max(0.0, self.arrival_time + self.timeout - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._push, None, _DEADLINE)

    # ---- OutputSink (called by the engine on the event loop) -----------------------------
    def deliver(self, out: RequestOutput) -> None:
        self._push(self._by_id[out.request_id], out)

    def fail(self, request_id: str, error: BaseException) -> None:
        self._push(self._by_id[request_id], error)

    def _push(self, state: ChoiceState | None, item: object) -> None:
        self._pending.append((state, item))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- the reader ----------------------------------------------------------------------
    async def next(self) -> list[Delta] | None:
        """Everything pending, one Delta per choice that moved; None when every choice has
        ended. Raises engine errors (and the deadline's 408) after the deltas before them."""
        while True:
            if self._pending:
                deltas = self._take()
                if deltas:
                    return deltas
            if self._error is not None:
                raise self._error
            if not self._open:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _take(self) -> list[Delta]:
        items, self._pending = self._pending, []
        deltas: dict[int, Delta] = {}
        now = time.monotonic()
        for state, item in items:
            if self._error is not None:
                break
            if item is _DEADLINE:
                self._error = APIError(408, f"The request did not finish within its deadline of "
                                            f"{self.timeout:g} s and was aborted.", code="request_timeout")
            elif isinstance(item, BaseException):
                state.finish_reason = state.finish_reason or "error"
                self._error = item
            else:
                try:
                    state.update(item, now)
                except APIError as exc:   # the engine ended it with an error: no delta, an error
                    self._error = exc
                    continue
                delta = deltas.setdefault(state.index, Delta(state))
                delta.text += item.new_text
                delta.logprobs.extend(item.logprobs or ())
                if item.finished:
                    delta.finished = True
                    self._open -= 1
        return list(deltas.values())

    async def collect(self) -> list[ChoiceState]:
        while await self.next() is not None:
            pass
        return self.states

    def close(self) -> None:
        """Abort what is unfinished and record every choice; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for s in self.states:
            if s.finish_reason is None:
                s.finish_reason = "abort"
                try:
                    self.engine.abort(s.request.request_id)
                except Exception:   # already gone from the engine: nothing left to free
                    log.debug("abort of %s failed", s.request.request_id, exc_info=True)
        self._record()

    def _record(self) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        for s in self.states:
            try:
                self.metrics.on_request_finished(RequestRecord(
                    arrival_time=self.arrival_time, finish_time=now,
                    first_scheduled_time=s.first_scheduled_time, token_times=s.token_times,
                    num_prompt_tokens=len(s.request.prompt_token_ids), num_generation_tokens=s.num_tokens,
                    finish_reason=s.finish_reason or "abort", n=self.n, max_tokens=self.max_tokens))
            except Exception:   # metrics must never fail a request
                log.exception("metrics.on_request_finished failed")


class SSEResponse:
    """Streams `events`; on client disconnect cancels itself, and always acloses `events`."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_exit: Callable[[], None] | None = None):
        self.events, self.on_exit = events, on_exit   # on_exit: run however the response ends

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()   # the client left: a normal end for the server, not a cancellation
        finally:
            watcher.cancel()   # synchronously first, so no cancel can land in the awaits below
            try:
                await self.events.aclose()
            finally:
                if self.on_exit is not None:
                    self.on_exit()
