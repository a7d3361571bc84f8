"""Shapers: one run's deltas (streaming.Job) → the OpenAI objects of one kind of request.
A `Shape` is a frame generator (streamed) plus a result builder (not streamed); chat
completions, completions and session turns (chat plus a hook) use the same run.

Streamed, in order: the opening frames (chat: a role delta per choice; completions with
echo: the prompt text) → per Job.next() batch, one frame per choice that moved (its text
concatenated, its logprobs all listed; then a finish frame when it ended), written in one
send → the usage frame (include_usage) → `on_complete(states)` when no error came → [DONE].
An error after the headers travels as an error frame, then [DONE]. The generator closes the
job (abort what is unfinished, record metrics) however it ends."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import AsyncGenerator, Callable

import orjson

from gateway.api import responses as R
from gateway.api.errors import from_exception
from gateway.api.streaming import ChoiceState, Delta, Job

DONE = b"data: [DONE]\n\n"
OnComplete = Callable[[list[ChoiceState]], Awaitable[None]]


def frame(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class ResponseContext:
    rid: str
    created: int
    model: str
    token_str: Callable[[int], str]
    prompt_tokens: int                    # each distinct prompt counted once
    include_usage: bool = False
    echo_texts: list[str] | None = None   # completions with echo: the prompt text per choice
    logprobs: bool = False                # the client asked for logprobs
    n: int = 1                            # choices per prompt (states are prompt-major)

    def cached_tokens(self, states: list[ChoiceState]) -> int:
        """Per distinct prompt, the smallest hit among its choices (prompt_tokens counts each
        prompt once, so the cached share of it must too)."""
        per_prompt: dict[int, int] = {}
        for s in states:
            p = s.index // self.n
            per_prompt[p] = min(per_prompt.get(p, s.num_cached_tokens), s.num_cached_tokens)
        return sum(per_prompt.values())

    def usage(self, states: list[ChoiceState]) -> dict:
        return R.usage(self.prompt_tokens, sum(s.num_tokens for s in states), self.cached_tokens(states))


async def stream_events(job: Job, ctx: ResponseContext, kind: str, opening: list[dict],
                  choice: Callable[[Delta], list[dict]], on_complete: OnComplete | None):
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        return frame(R.envelope(kind, ctx.rid, ctx.created, ctx.model, choices, usage, with_usage=ctx.include_usage))
    try:
        try:
            if opening:
                yield b"".join(chunk([c]) for c in opening)
            while (deltas := await job.next()) is not None:
                frames = b"".join(chunk([c]) for d in deltas for c in choice(d))
                if frames:
                    yield frames
            if ctx.include_usage:
                yield chunk([], ctx.usage(job.states))
            if on_complete is not None:
                await on_complete(job.states)
        except Exception as exc:   # headers are sent: the error travels as a frame
            yield frame(from_exception(exc).body())
        yield DONE
    finally:
        job.close()


def chat_events(job: Job, ctx: ResponseContext, on_complete: OnComplete | None = None) -> AsyncGenerator[bytes, None]:
    def choice(d: Delta) -> list[dict]:
        out = []
        lp = R.chat_logprobs(d.logprobs, ctx.token_str) if d.logprobs else None
        if d.text or lp:
            out.append(R.chat_delta(d.state.index, {"content": d.text}, None, lp))
        if d.finished:
            out.append(R.chat_delta(d.state.index, {}, d.state.finish_reason))
        return out
    opening = [R.chat_delta(s.index, {"role": "assistant", "content": ""}) for s in job.states]
    return stream_events(job, ctx, "chat.completion.chunk", opening, choice, on_complete)


def completion_events(job: Job, ctx: ResponseContext,
                      on_complete: OnComplete | None = None) -> AsyncGenerator[bytes, None]:
    offsets = [len(ctx.echo_texts[s.index]) if ctx.echo_texts else 0 for s in job.states]

    def choice(d: Delta) -> list[dict]:
        out, i = [], d.state.index
        lp = None
        if d.logprobs:
            lp, offsets[i] = R.completion_logprobs(d.logprobs, ctx.token_str, offsets[i])
        if d.text or lp:
            out.append(R.text_choice(i, d.text, None, lp))
        if d.finished:
            out.append(R.text_choice(i, "", d.state.finish_reason))
        return out
    opening = [R.text_choice(s.index, ctx.echo_texts[s.index]) for s in job.states] if ctx.echo_texts else []
    return stream_events(job, ctx, "text_completion", opening, choice, on_complete)


def chat_result(states: list[ChoiceState], ctx: ResponseContext) -> dict:
    choices = [R.chat_choice(s.index, "".join(s.text), s.finish_reason,
                             R.chat_logprobs(s.logprobs, ctx.token_str) if ctx.logprobs else None)
               for s in states]
    return R.envelope("chat.completion", ctx.rid, ctx.created, ctx.model, choices, ctx.usage(states))


def completion_result(states: list[ChoiceState], ctx: ResponseContext) -> dict:
    choices = []
    for s in states:
        prefix = ctx.echo_texts[s.index] if ctx.echo_texts else ""
        lp = R.completion_logprobs(s.logprobs, ctx.token_str, len(prefix))[0] if ctx.logprobs else None
        choices.append(R.text_choice(s.index, prefix + "".join(s.text), s.finish_reason, lp))
    return R.envelope("text_completion", ctx.rid, ctx.created, ctx.model, choices, ctx.usage(states))


@dataclass(frozen=True)
class Shape:
    events: Callable[..., AsyncGenerator[bytes, None]]          # (job, ctx, on_complete) → frames
    result: Callable[[list[ChoiceState], ResponseContext], dict]


CHAT = Shape(chat_events, chat_result)
COMPLETION = Shape(completion_events, completion_result)
