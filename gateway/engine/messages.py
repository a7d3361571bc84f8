"""Every dataclass that crosses a boundary between the API side and the engine core
(and, for tensor parallelism, between processes). Plain data only; the inbox messages
(Add, Abort, Call) are what the event loop posts to the engine thread, in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.sampling.logprobs import TokenLogprob
from gateway.sampling.params import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    pooling: str | None = None     # "last" | "mean": an embedding (prefill only), not a generation


@dataclass
class RequestOutput:
    """A delta: what one request gained in one engine step."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None = None   # one per new token when asked for
    finished: bool = False
    finish_reason: str | None = None            # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0                   # total so far
    stop_reason: str | int | None = None         # the stop string or token that ended it
    first_scheduled_time: float | None = None    # monotonic; when the request first got compute
    embedding: list[float] | None = None         # pooling requests: the L2-normalized vector


@dataclass
class StepStats:
    """Attached by the engine core to every step, for /metrics; AsyncEngine also publishes one
    between steps (after adds, aborts, calls) with the per-step counts at 0."""
    num_running: int = 0
    num_waiting: int = 0              # accepted, not yet scheduled: the scheduler's queue + the inbox
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0          # in this step
    num_recomputed_tokens: int = 0    # in this step: tokens a preemption had dropped, computed again
    prefix_cache_queries: int = 0     # tokens looked up in this step
    prefix_cache_hits: int = 0        # tokens found in this step
    num_batched_tokens: int = 0       # iteration tokens
    num_free_blocks: int = 0
    num_total_blocks: int = 0


@dataclass
class RequestRecord:
    """What the API layer knows about a request when it ends; feeds the request histograms."""
    arrival_time: float                    # monotonic, when the HTTP request was accepted
    finish_time: float
    first_scheduled_time: float | None     # from the first RequestOutput
    token_times: list[float]               # monotonic time of each output token's arrival
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reason: str                     # stop | length | abort | error
    n: int = 1
    max_tokens: int | None = None


# ---- the engine thread's inbox (posted by AsyncEngine on the event loop) -------------------

@dataclass
class Add:
    request: EngineRequest            # already checked by EngineCore.check_request


@dataclass
class Abort:
    request_id: str


@dataclass
class Call:
    fn: Callable[[Any], object]       # fn(core), run between steps
    future: Any                       # the asyncio.Future the event loop resolves with its result


InboxMessage = Add | Abort | Call
