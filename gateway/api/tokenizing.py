"""Tokenizer work for the routes, kept off the event loop: `Tokenizing` runs the chat template,
encode and decode of a large request on ONE dedicated thread, and a small one inline.

Why a thread: a 3.5 MB prompt takes about 4 s to encode here, and on the event loop that was
4 s without /health (a liveness probe times out after 5 s) or any stream's next frame. The fast
tokenizer's Rust encode releases the GIL and Jinja templating gives it up every switch
interval, so in the thread the loop keeps answering within tens of ms. Why only one: the
engine owns the compute threads of our 2 cores; one tokenizing thread takes at most one core
from it however many large requests arrive (they queue here), and it keeps the tokenizer used
by at most two threads at once, as before (the event loop and the engine's detokenizer).
Why inline below INLINE_CHARS: a thread hop costs more than encoding a short prompt.

Sizes are in characters (plus a per-message allowance for the template's own work), known
before anything is tokenized. Side effects: the thread, started on first use and stopped by
close() (the app's lifespan)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, TypeVar

INLINE_CHARS = 4096          # at 1-1.5 us per character, a few ms at most on the event loop
PER_MESSAGE_CHARS = 64       # what rendering one message costs, in characters' worth

T = TypeVar("T")


def chat_size(messages: list[dict], tools: list[dict] | None = None) -> int:
    calls = sum(len(str(m["tool_calls"])) for m in messages if m.get("tool_calls"))
    return (sum(len(m["content"]) for m in messages) + PER_MESSAGE_CHARS * len(messages) + calls
            + (len(str(tools)) if tools else 0))


class Tokenizing:
    def __init__(self, engine, inline_chars: int = INLINE_CHARS):
        self.engine, self.inline_chars = engine, inline_chars
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args) -> T:
        """fn(*args), on the tokenizing thread when `size` (characters) is above the threshold."""
        if size <= self.inline_chars:
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """tools: passed to the template only when given (it reads its `tools` variable)."""
        encode = self.engine.encode_chat if tools is None else partial(self.engine.encode_chat, tools=tools)
        return await self.run(chat_size(messages, tools), encode, messages)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(len(text), self.engine.encode, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        # a token is several characters of text: a list of ids is weighed a little heavier
        return await self.run(4 * len(token_ids), self.engine.decode, token_ids)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
