"""AsyncEngine: the API side's handle on the engine. The EngineCore runs in one daemon
thread (torch releases the GIL while it computes, so the event loop stays responsive);
the event loop talks to it through an inbox and gets each step's outputs back in one
call_soon_threadsafe.

One thread owns the model: from_config loads it (blocking) inside the engine thread, and the
same thread later runs the loop. Why: libgomp keeps one OpenMP pool per thread that starts a
parallel region; a model loaded (and prepacked) in the main thread and stepped in another
makes two pools on our 2 cores, and libgomp then stops spinning between parallel regions and
sleeps on a futex in each of the thousands per step: 43 ms per token instead of 23.

Order of side effects: from_config starts the engine thread, which loads the model → start()
lets that thread run the loop, which runs a one-token warm-up before it reports ready →
submit(requests, sink) admits a request's choices (all or none, refusals raised at once) and
posts them → after each step the outputs go, in one call_soon_threadsafe, straight to each
request's sink (api/streaming.py's Job: one hop per token) → abort() for a consumer that stops
early → shutdown(). call_in_engine(fn) runs fn(core) on the loop thread between steps (prefix
pins use it), in inbox order with adds and aborts. The inbox carries typed messages
(messages.Add, Abort, Call). After every step and every drain of the inbox the loop
publishes a StepStats snapshot: the metrics' gauges, /ready's kv_blocks_in_use and
num_waiting() (accepted, not yet scheduled: what --max-waiting-requests limits) read it, so
they are fresh also when no step runs. With tensor parallelism the loop checks the workers'
health every iteration (a dead one wakes it at once) and stops them when it ends; a death
takes the crash path: every request fails with EngineDeadError (api/server.py then exits)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from gateway.config import Config
from gateway.engine.client import OutputSink
from gateway.engine.core import EngineCore
from gateway.engine.engine_thread import EngineThread
from gateway.engine.errors import EngineDeadError, QueueFullError
from gateway.engine.messages import Abort, Add, Call, EngineRequest, InboxMessage, RequestOutput, StepStats
from gateway.sampling.params import SamplingParams

log = logging.getLogger("gateway.engine")


class AsyncEngine:
    def __init__(self, config: Config, core: EngineCore,
                 step_listener: Callable[[StepStats], None] | None = None):
        self.config = config
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_name = config.served_model_name or core.source.name
        self.max_model_len = core.max_model_len
        self.embedding_size = core.runner.arch.hidden_size   # the length of an embedding vector
        self.chat_template = Path(config.chat_template).read_text() if config.chat_template else None
        self._step_listener = step_listener
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._sinks: dict[str, OutputSink] = {}   # event loop side: request id → where its outputs go
        self._calls: set[asyncio.Future] = set()   # call_in_engine futures not yet resolved
        self._thread: EngineThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ready = False
        self._dead: BaseException | None = None
        self.draining = False   # set by the server on SIGTERM: the API takes no new work (api/server.py)
        core.runner.death_listener = self._wakeup.set   # a dead tensor-parallel worker wakes an idle loop
        self._latest_stats = StepStats(num_total_blocks=core.runner.num_blocks,
                                       num_free_blocks=core.runner.num_blocks)
        # Waiting = accepted but not yet scheduled: the scheduler's queue (as of the engine
        # thread's latest look) plus adds still in the inbox. Each counter has one writer.
        self._adds_posted = 0        # event loop
        self._adds_taken = 0         # engine thread
        self._scheduler_waiting = 0  # engine thread

    @classmethod
    def from_config(cls, config: Config, step_listener=None) -> "AsyncEngine":
        """Load the model in the engine thread (see the module docstring); load errors re-raise here."""
        thread = EngineThread(lambda: EngineCore(config))
        engine = cls(config, thread.wait_built(), step_listener)
        engine._thread = thread
        return engine

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is None:   # a core built by the caller: a fresh thread runs the loop
            self._thread = EngineThread(None)
        self._thread.run_next(self._run)

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            if self._loop is None:   # never started: the thread only has to stop the workers
                self._thread.run_next(self.core.shutdown)
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def is_alive(self) -> bool:
        """False from the moment a death is known, also before the loop itself notices it: a
        dead tensor-parallel worker is declared by the executor's monitor thread, and the loop
        only sees it at its next health check or collective (so /health, /ready and admission
        all answer from this one check)."""
        if self._thread is None or not self._thread.is_alive() or self._dead is not None:
            return False
        try:
            self.core.check_health()
        except Exception:
            return False
        return True

    def is_ready(self) -> bool:
        return self._ready and self.is_alive

    def stats(self) -> StepStats:
        return self._latest_stats

    def worker_pids(self) -> list[int]:
        """PIDs of the tensor-parallel worker processes (empty at tp=1)."""
        return self.core.worker_pids

    def num_kv_blocks_in_use(self) -> int:
        """From the engine thread's latest snapshot (after every step, drain and call): never
        waits for a step, and tells what /metrics tells."""
        s = self._latest_stats
        return s.num_total_blocks - s.num_free_blocks

    def num_waiting(self) -> int:
        """Requests accepted but not yet scheduled (preempted ones included): what the
        num_requests_waiting gauge shows and --max-waiting-requests limits."""
        return self._scheduler_waiting + self._adds_posted - self._adds_taken

    # ---- the loop thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._warm_up()
            self._publish(self._snapshot())
            self._ready = True
            while not self._stopping:
                self.core.check_health()
                if self._drain_inbox():   # adds and aborts move the gauges even with no step to run
                    self._publish(self._snapshot())
                if not self.core.has_work:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                outputs, stats = self.core.step()
                self._publish(stats)   # before the outputs: a client that saw its end sees the gauges after it
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # the loop must never die silently
            self._dead = exc   # first: is_alive turns false before the traceback is formatted
            log.error("engine loop crashed:\n%s", traceback.format_exc())
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, exc)
        finally:
            self.core.shutdown()   # tensor-parallel workers stop with the loop

    def _warm_up(self) -> None:
        """One real token through the whole path: readiness means 'can produce a token'."""
        request_id = f"warmup-{uuid.uuid4().hex}"
        self.core.add_request(EngineRequest(request_id, [self._any_token()], SamplingParams(max_tokens=1, temperature=0)))
        while request_id in self.core.requests:
            self.core.step()

    def _any_token(self) -> int:
        return next(iter(self.core.eos_token_ids), 0)

    def _snapshot(self) -> StepStats:
        """The scheduler's state between steps (no per-step counts)."""
        s = self.core.scheduler
        return StepStats(num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
                         num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks)

    def _publish(self, stats: StepStats) -> None:
        """Engine thread: the snapshot /ready and num_waiting() read, and the metrics' input.
        stats.num_waiting comes in as the scheduler's queue and goes out with the inbox added."""
        self._scheduler_waiting = stats.num_waiting
        stats.num_waiting = self.num_waiting()
        self._latest_stats = stats
        if self._step_listener is not None:
            self._step_listener(stats)

    def _drain_inbox(self) -> bool:
        """Everything posted so far, in order; True when there was anything."""
        took = False
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return took
            took = True
            if isinstance(message, Add):
                self._take_add(message.request)
            elif isinstance(message, Call):
                self._run_call(message.fn, message.future)
            else:
                output = self.core.abort(message.request_id)
                if output is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, [output])

    def _take_add(self, request: EngineRequest) -> None:
        try:
            self.core.admit(request)   # submit() ran core.check_request on the event loop
        except Exception as exc:  # a poisoned request fails alone
            self._loop.call_soon_threadsafe(self._deliver_error, request.request_id, exc)
        finally:
            # In this order, num_waiting() counts the request twice for a moment, never zero times.
            self._scheduler_waiting = self.core.scheduler.num_waiting
            self._adds_taken += 1

    def _run_call(self, fn, future: asyncio.Future) -> None:
        try:
            result, error = fn(self.core), None
        except Exception as exc:   # the caller gets it; the loop goes on
            result, error = None, exc
        self._publish(self._snapshot())   # a pin or unpin shows in /ready before the caller resumes
        self._loop.call_soon_threadsafe(self._resolve_call, future, result, error)

    # ---- event-loop side -----------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """The one hop: each output to its request's sink (late ones for gone requests drop)."""
        sinks = self._sinks
        for out in outputs:
            sink = sinks.pop(out.request_id, None) if out.finished else sinks.get(out.request_id)
            if sink is not None:
                sink.deliver(out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink.fail(request_id, exc)

    def fail_in_flight(self, make_error: Callable[[], BaseException]) -> int:
        """Event loop side: end every in-flight request with make_error() (what the drain
        deadline does): each is aborted in the engine (its KV blocks freed) and its sink gets
        the error. Returns how many requests were ended."""
        ended = list(self._sinks)
        for request_id in ended:
            sink = self._sinks.pop(request_id)
            self.abort(request_id)
            sink.fail(request_id, make_error())
        return len(ended)

    def _fail_all(self, exc: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            sink.fail(request_id, EngineDeadError(f"the engine stopped: {exc!r}"))
        for future in list(self._calls):
            self._resolve_call(future, None, EngineDeadError(f"the engine stopped: {exc!r}"))

    def _resolve_call(self, future: asyncio.Future, result, error: BaseException | None) -> None:
        self._calls.discard(future)
        if future.done():   # the caller gave up waiting
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def submit(self, requests: list[EngineRequest], sink: OutputSink) -> None:
        """Admit all of `requests` (the choices of one HTTP request) or none, synchronously:
        EngineDeadError, QueueFullError (they would be one too many waiting) or
        RequestRejectedError (EngineCore.check_request) is raised before anything is posted."""
        if self._dead is not None or (self._thread is not None and not self._thread.is_alive()):
            raise EngineDeadError("the engine is not running")
        waiting = self.num_waiting()
        if waiting + len(requests) > self.config.max_waiting_requests:
            raise QueueFullError(f"{waiting} requests are waiting to be scheduled, the server's limit "
                                 f"(--max-waiting-requests {self.config.max_waiting_requests}); retry later")
        for request in requests:
            self.core.check_request(request)
        for request in requests:
            self._sinks[request.request_id] = sink
            self._adds_posted += 1   # before the put: the engine thread must never take more than was posted
            self._inbox.put(Add(request))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Ends the request in the engine (its blocks freed); its sink hears nothing more."""
        self._sinks.pop(request_id, None)
        self._inbox.put(Abort(request_id))
        self._wakeup.set()

    def call_in_engine(self, fn: Callable[[EngineCore], object]) -> asyncio.Future:
        """Queue fn(core) for the engine thread now (in order with adds and aborts); the
        returned future resolves with its result or exception."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        future = self._loop.create_future()
        self._calls.add(future)
        self._inbox.put(Call(fn, future))
        self._wakeup.set()
        return future

    def pin_prefix(self, key, token_ids: list[int]) -> asyncio.Future:
        """Future of the number of KV blocks of token_ids' cached prefix now held for key."""
        ids = list(token_ids)
        return self.call_in_engine(lambda core: core.pin_prefix(key, ids))

    def unpin_prefix(self, key) -> asyncio.Future:
        return self.call_in_engine(lambda core: core.unpin_prefix(key))

    # ---- tokenizer helpers (event loop) --------------------------------------------------
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """tools: OpenAI function tools for a template that reads its `tools` variable."""
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this model has no chat template; start the server with --chat-template FILE")
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, tools=tools)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
