"""Engine output streams → OpenAI results: fan-out, merge, SSE.

Owns `Job` (the n engine requests behind one HTTP request: one pump task per choice feeding
a shared queue, per-choice state, abort and metrics on close), the SSE frame format,
`SSEResponse` (a pure ASGI response that closes its frame generator on every exit path,
client disconnect included — Starlette's StreamingResponse leaves it suspended when the
cancellation lands in `send`), the chunk generators and the non-streamed result builders.

Order of side effects for a streamed request: Job.start() submits every choice → SSEResponse
sends the headers → one frame per delta → [DONE] → Job.close(): cancel the pumps (each
`finally` acloses its engine iterator, which aborts the request and frees its KV blocks),
engine.abort() for anything unfinished, one metrics record per choice.
A Job with a `timeout` arms one timer at start(); when it fires before the last choice ends,
next() raises a 408 APIError (an error frame when streaming) and close() aborts the rest."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable

import orjson

from gateway.api import protocol as P
from gateway.api.errors import APIError, from_exception
from gateway.engine.errors import QueueFullError, RequestRejectedError
from gateway.engine.messages import EngineRequest, RequestOutput, RequestRecord
from gateway.sampling.logprobs import TokenLogprob

log = logging.getLogger("gateway.api")
DONE = b"data: [DONE]\n\n"
# Refused at admission (429 queue full, 400 rejected by the engine's checks): recorded under
# finish reason "rejected", not as an error or abort of work the engine did.
REFUSALS = (QueueFullError, RequestRejectedError)
_DEADLINE = object()   # queued by the deadline timer in place of an output
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]   # keep reverse proxies from buffering the stream


def frame(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class ChoiceState:
    index: int
    request: EngineRequest
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
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
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            if self.finish_reason == "error":   # out.error is written for the client (core.py logs the cause)
                raise APIError(500, f"generation failed: {out.error or 'engine error'}", code="engine_error")
            if self.finish_reason == "abort":   # we did not ask for it: the engine is going away
                raise APIError(503, "the engine aborted the request", code="engine_abort")


class Job:
    """The engine requests of one HTTP request, merged into one stream of deltas."""

    def __init__(self, engine, requests: list[EngineRequest], metrics=None,
                 arrival_time: float | None = None, n: int = 1, max_tokens: int | None = None,
                 timeout: float | None = None):
        self.engine, self.metrics, self.n = engine, metrics, n
        self.timeout = timeout         # seconds from arrival_time; None: no deadline
        self._timer: asyncio.TimerHandle | None = None
        self.max_tokens = max_tokens   # as the client asked: None when left to the context
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.states = [ChoiceState(i, r) for i, r in enumerate(requests)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._pending = len(self.states)
        self._closed = False
        self.submit_error: BaseException | None = None

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(s)) for s in self.states]
        if self.timeout is not None:
            delay = max(0.0, self.arrival_time + self.timeout - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, (None, _DEADLINE))

    async def _pump(self, state: ChoiceState) -> None:
        stream = None
        try:
            stream = self.engine.generate(state.request)
            async for out in stream:
                self._queue.put_nowait((state, out))
        except Exception as exc:
            if state.num_tokens == 0 and self.submit_error is None:
                self.submit_error = exc
            if isinstance(exc, REFUSALS) and state.num_tokens == 0:   # the engine ran nothing for it
                state.finish_reason = "rejected"
            self._queue.put_nowait((state, exc))
        finally:
            self._queue.put_nowait((state, None))
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()   # no-op when finished; otherwise the engine aborts

    async def refused(self) -> BaseException | None:
        """An error raised at submission (queue full, engine dead), so that a streamed
        request can still answer with its own status instead of an error frame."""
        for _ in range(3):   # enough loop turns for each pump to reach the engine's queue
            await asyncio.sleep(0)
        return self.submit_error

    async def next(self) -> tuple[ChoiceState, RequestOutput] | None:
        """The next delta of any choice; None when every choice has ended. Raises engine errors."""
        while self._pending:
            state, item = await self._queue.get()
            if item is _DEADLINE:
                raise APIError(408, f"The request did not finish within its deadline of {self.timeout:g} s "
                                    "and was aborted.", code="request_timeout")
            if item is None:
                self._pending -= 1
            elif isinstance(item, BaseException):
                state.finish_reason = state.finish_reason or "error"
                raise item
            else:
                state.update(item, time.monotonic())
                return state, item
        return None

    async def collect(self) -> list[ChoiceState]:
        while await self.next() is not None:
            pass
        return self.states

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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

    def __init__(self, events: AsyncGenerator[bytes, None]):
        self.events = events

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
            await self.events.aclose()


@dataclass
class ResponseContext:
    rid: str
    created: int
    model: str
    token_str: Callable[[int], str]
    prompt_tokens: int                    # each distinct prompt counted once
    include_usage: bool = False
    echo_texts: list[str] | None = None   # completions with echo: the prompt text per choice

    def usage(self, states: list[ChoiceState]) -> dict:
        return P.usage(self.prompt_tokens, sum(s.num_tokens for s in states))


async def chat_events(job: Job, ctx: ResponseContext) -> AsyncGenerator[bytes, None]:
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        return frame(P.envelope("chat.completion.chunk", ctx.rid, ctx.created, ctx.model, choices,
                                usage, with_usage=ctx.include_usage))
    try:
        try:
            for s in job.states:
                yield chunk([P.chat_delta(s.index, {"role": "assistant", "content": ""})])
            while (event := await job.next()) is not None:
                state, out = event
                lp = P.chat_logprobs(out.logprobs, ctx.token_str) if out.logprobs else None
                if out.new_text or lp:
                    yield chunk([P.chat_delta(state.index, {"content": out.new_text}, None, lp)])
                if out.finished:
                    yield chunk([P.chat_delta(state.index, {}, state.finish_reason)])
            if ctx.include_usage:
                yield chunk([], ctx.usage(job.states))
        except Exception as exc:   # headers are sent: the error travels as a frame
            yield frame(from_exception(exc).body())
        yield DONE
    finally:
        await job.close()


async def completion_events(job: Job, ctx: ResponseContext) -> AsyncGenerator[bytes, None]:
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        return frame(P.envelope("text_completion", ctx.rid, ctx.created, ctx.model, choices,
                                usage, with_usage=ctx.include_usage))
    offsets = [0] * len(job.states)
    try:
        try:
            for s in job.states if ctx.echo_texts else ():
                offsets[s.index] = len(ctx.echo_texts[s.index])
                yield chunk([P.text_choice(s.index, ctx.echo_texts[s.index])])
            while (event := await job.next()) is not None:
                state, out = event
                lp = None
                if out.logprobs:
                    lp, offsets[state.index] = P.completion_logprobs(out.logprobs, ctx.token_str,
                                                                     offsets[state.index])
                if out.new_text or lp:
                    yield chunk([P.text_choice(state.index, out.new_text, None, lp)])
                if out.finished:
                    yield chunk([P.text_choice(state.index, "", state.finish_reason)])
            if ctx.include_usage:
                yield chunk([], ctx.usage(job.states))
        except Exception as exc:
            yield frame(from_exception(exc).body())
        yield DONE
    finally:
        await job.close()


def chat_result(states: list[ChoiceState], ctx: ResponseContext, logprobs: bool) -> dict:
    choices = [P.chat_choice(s.index, "".join(s.text), s.finish_reason,
                             P.chat_logprobs(s.logprobs, ctx.token_str) if logprobs else None)
               for s in states]
    return P.envelope("chat.completion", ctx.rid, ctx.created, ctx.model, choices, ctx.usage(states))


def completion_result(states: list[ChoiceState], ctx: ResponseContext, logprobs: bool) -> dict:
    choices = []
    for s in states:
        prefix = ctx.echo_texts[s.index] if ctx.echo_texts else ""
        lp = P.completion_logprobs(s.logprobs, ctx.token_str, len(prefix))[0] if logprobs else None
        choices.append(P.text_choice(s.index, prefix + "".join(s.text), s.finish_reason, lp))
    return P.envelope("text_completion", ctx.rid, ctx.created, ctx.model, choices, ctx.usage(states))
