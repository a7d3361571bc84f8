"""`EngineClient`: everything the API layer may call on its engine object, and `OutputSink`,
what the engine hands each request's outputs to. AsyncEngine implements EngineClient (so
does the FakeEngine of tests/test_api_app.py); api/ programs against this Protocol alone,
so it never probes the engine for attributes.

Threading: every method is called on the event loop. A sink's methods are called on the
event loop too (the engine thread hands a step's outputs over in one call_soon_threadsafe),
one call per output: the one hop a token makes between the engine and its HTTP response."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from gateway.engine.messages import EngineRequest, RequestOutput, StepStats


@runtime_checkable
class OutputSink(Protocol):
    def deliver(self, out: RequestOutput) -> None: ...            # a delta; the last has finished=True

    def fail(self, request_id: str, error: BaseException) -> None: ...   # the request ended with error


@runtime_checkable
class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    embedding_size: int          # /v1/embeddings: the model's hidden size
    tokenizer: object            # len(tokenizer) is the vocabulary size
    draining: bool               # set on SIGTERM: no new work (api/server.py)

    @property
    def is_alive(self) -> bool: ...

    def is_ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def submit(self, requests: list[EngineRequest], sink: OutputSink) -> None:
        """Admit all of `requests` or none: raises EngineDeadError, QueueFullError or
        RequestRejectedError (the one check of prompt + max_tokens against the context)
        synchronously, before anything is queued. Outputs then go to sink."""

    def abort(self, request_id: str) -> None: ...        # no output reaches the sink afterwards

    def fail_in_flight(self, make_error: Callable[[], BaseException]) -> int: ...

    def pin_prefix(self, key, token_ids: list[int]) -> asyncio.Future: ...

    def unpin_prefix(self, key) -> asyncio.Future: ...

    def stats(self) -> StepStats: ...

    def num_kv_blocks_in_use(self) -> int: ...

    def worker_pids(self) -> list[int]: ...

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def token_str(self, token_id: int) -> str: ...
