"""The Shape of a chat completion that offers tools (`TOOL_CHAT`): each choice's text
goes through its own ToolCallParser (tool_calls.py) for the template's call format
(`TOOL_CHATS[format]`, tool_formats.py), streamed or not.

Streamed, per choice: the opening delta {"role": "assistant"} (content null, as OpenAI sends
it when tools may be called) → per batch of new text, one delta with the content that became
certain and/or `tool_calls` entries: a call's first entry has index, id, type and
function.name (arguments ""), later ones index and an arguments fragment → the finish delta.
Not streamed: message.content (null when the reply was only calls) and message.tool_calls.
A choice that made calls and stopped ends with finish_reason "tool_calls"."""

from __future__ import annotations

from functools import partial

from gateway.api import responses as R
from gateway.api.shapers import ResponseContext, Shape, stream_events
from gateway.api.streaming import ChoiceState, Delta, Job
from gateway.api.tool_calls import Event, ToolCallParser
from gateway.api.tool_formats import FORMATS, HERMES


def finish_reason(parser: ToolCallParser, state: ChoiceState) -> str | None:
    return "tool_calls" if parser.calls and state.finish_reason == "stop" else state.finish_reason


def _delta(events: list[Event], parser: ToolCallParser) -> dict:
    """One delta object for a batch of parser events: content joined, calls merged by index."""
    content = "".join(e.text for e in events if e.kind == "content")
    calls: dict[int, dict] = {}
    for e in events:
        if e.kind == "call":
            call = parser.calls[e.index]
            calls[e.index] = {"index": e.index, "id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": ""}}
        elif e.kind == "arguments":
            entry = calls.setdefault(e.index, {"index": e.index, "function": {"arguments": ""}})
            entry["function"]["arguments"] += e.text
    delta: dict = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


def _message(parser: ToolCallParser) -> dict:
    message = {"role": "assistant", "content": parser.content or None}
    if parser.calls:
        message["tool_calls"] = [c.openai() for c in parser.calls]
    return message


def tool_chat_events(job: Job, ctx: ResponseContext, on_complete=None, fmt: str = HERMES):
    parsers = [ToolCallParser(fmt=fmt) for _ in job.states]

    def choice(d: Delta) -> list[dict]:
        parser = parsers[d.state.index]
        batch = parser.feed(d.text) + (parser.finish() if d.finished else [])
        delta = _delta(batch, parser)
        lp = R.chat_logprobs(d.logprobs, ctx.token_str) if d.logprobs else None
        out = [R.chat_delta(d.state.index, delta, None, lp)] if delta or lp else []
        if d.finished:
            out.append(R.chat_delta(d.state.index, {}, finish_reason(parser, d.state)))
        return out
    opening = [R.chat_delta(s.index, {"role": "assistant", "content": None}) for s in job.states]
    return stream_events(job, ctx, "chat.completion.chunk", opening, choice, on_complete)


def tool_chat_result(states: list[ChoiceState], ctx: ResponseContext, fmt: str = HERMES) -> dict:
    choices = []
    for s in states:
        parser = ToolCallParser(fmt=fmt)
        parser.feed("".join(s.text))
        parser.finish()
        lp = R.chat_logprobs(s.logprobs, ctx.token_str) if ctx.logprobs else None
        choices.append({"index": s.index, "message": _message(parser), "logprobs": lp,
                        "finish_reason": finish_reason(parser, s)})
    return R.envelope("chat.completion", ctx.rid, ctx.created, ctx.model, choices, ctx.usage(states))


TOOL_CHAT = Shape(tool_chat_events, tool_chat_result)   # for requests whose tools are active
TOOL_CHATS = {fmt: Shape(partial(tool_chat_events, fmt=fmt), partial(tool_chat_result, fmt=fmt)) for fmt in FORMATS}
