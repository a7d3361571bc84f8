"""POST /v1/responses (OpenAI's Responses API), stateless: nothing is stored, so `store` may
only be false and `previous_response_id` is a 400 naming it.

Per request, in order: fields checked (unsupported ones, `tools` included, are 400s naming
them) → `instructions` + `input` (a string, or message items with roles user / system /
developer / assistant and input_text / output_text parts) become chat messages, and
max_output_tokens / temperature / top_p / text.format become a chat body for
protocol.parse_chat (its errors renamed to this API's fields; text.format json_schema goes to
the structured-output code like response_format) → the chat template → the pipeline's admit
and run with the RESPONSES shape here: one `response` object, or the typed SSE events
(`event: <type>` + JSON with `type` and `sequence_number`, as the openai SDK parses them):
response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or
response.incomplete with incomplete_details.reason max_output_tokens; an `error` event if the
run fails after the headers)."""

from __future__ import annotations

import time
import uuid

import orjson

from gateway.api import protocol as P
from gateway.api.errors import APIError, from_exception, invalid
from gateway.api.shapers import ResponseContext, Shape
from gateway.api.streaming import ChoiceState, Job

FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text",
                    "stream", "store", "metadata", "user", "previous_response_id", "parallel_tool_calls",
                    "truncation", "tool_choice"})
UNSUPPORTED = frozenset({"tools", "reasoning", "include", "background", "service_tier", "prompt", "top_logprobs",
                         "max_tool_calls", "conversation", "stream_options", "safety_identifier",
                         "prompt_cache_key"})
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
PART_TYPES = ("input_text", "output_text", "text")   # a tuple: `in` must not hash client values


def _reject(body: dict) -> None:
    for key, value in body.items():
        if key in UNSUPPORTED and value is not None and not (key == "tools" and value == []):
            raise invalid(key, f"`{key}` is not supported by this server", code="unsupported_parameter")
        if key not in FIELDS and key not in UNSUPPORTED:
            raise invalid(key, f"Unrecognized request argument supplied: {key}", code="unknown_parameter")
    if body.get("store") not in (None, False):
        raise invalid("store", "`store` must be false: this server keeps no responses", code="unsupported_parameter")
    if body.get("previous_response_id") is not None:
        raise invalid("previous_response_id", "`previous_response_id` is not supported: this server keeps no "
                                              "responses; send the whole conversation in `input`",
                      code="unsupported_parameter")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("tool_choice", "`tool_choice` needs tools, which this server does not support on "
                                     "/v1/responses", code="unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise invalid("truncation", "`truncation` must be disabled", code="unsupported_parameter")


def _content(item: dict, i: int) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"input[{i}].content", "`content` must be a string or an array of text parts")
    parts = P.bounded(content, f"input[{i}].content", P.MAX_CONTENT_PARTS)
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise invalid(f"input[{i}].content", "content parts must be input_text or output_text objects "
                                                 "with a `text` string")
        texts.append(part["text"])
    return "".join(texts)


def messages_of(body: dict) -> list[dict]:
    """instructions + input → chat messages (roles as chat takes them)."""
    messages = []
    instructions = P.get(body, "instructions", "string")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    value = body.get("input")
    if isinstance(value, str):
        return messages + [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input", "`input` must be a string or a non-empty array of message items")
    for i, item in enumerate(P.bounded(value, "input", P.MAX_MESSAGES)):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise invalid(f"input[{i}]", "only message items are supported (type `message`)")
        if item.get("role") not in ("user", "system", "developer", "assistant"):
            raise invalid(f"input[{i}].role", "`role` must be user, system, developer or assistant")
        messages.append({"role": item["role"], "content": _content(item, i)})
    return messages


def _response_format(body: dict) -> dict | None:
    text = P.get(body, "text", "object")
    if text is None:
        return None
    if set(text) - {"format", "verbosity"}:
        raise invalid("text", "`text` takes only `format`")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("text.format", "`text.format.type` must be text, json_object or json_schema")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


def parse(body: dict, info: P.ModelInfo) -> tuple[P.ChatRequest, dict]:
    """(the chat request it amounts to, the fields the response object echoes)."""
    _reject(body)
    chat = {"messages": messages_of(body), "stream": body.get("stream"), "model": body.get("model"),
            "max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "response_format": _response_format(body), "user": body.get("user")}
    try:
        req = P.parse_chat({k: v for k, v in chat.items() if v is not None}, info)
    except APIError as exc:
        raise rename(exc) from None
    echo = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "metadata": body.get("metadata") or {}, "text": body.get("text") or {"format": {"type": "text"}}}
    return req, echo


def rename(exc: APIError) -> APIError:
    """A chat-side error, named with this API's field."""
    if exc.param:
        head, dot, rest = exc.param.partition(".")
        if head in RENAMED:
            exc.param = RENAMED[head] + dot + rest
            exc.message = exc.message.replace(f"`{head}`", f"`{RENAMED[head]}`")
    return exc


# ---- the shape ----------------------------------------------------------------------------

def usage(ctx: ResponseContext, states: list[ChoiceState]) -> dict:
    out = sum(s.num_tokens for s in states)
    return {"input_tokens": ctx.prompt_tokens, "input_tokens_details": {"cached_tokens": ctx.cached_tokens(states)},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": ctx.prompt_tokens + out}


def _message(ctx: ResponseContext, text: str | None, status: str) -> dict:
    content = [] if text is None else [_part(text)]
    return {"id": "msg_" + ctx.rid[5:], "type": "message", "status": status, "role": "assistant", "content": content}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(ctx: ResponseContext, echo: dict, states: list[ChoiceState] | None) -> dict:
    """The response: in progress (states None) or finished."""
    obj = {"id": ctx.rid, "object": "response", "created_at": ctx.created, "model": ctx.model,
           "status": "in_progress", "output": [], "output_text": "", "error": None, "incomplete_details": None,
           "usage": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "store": False,
           "previous_response_id": None, "truncation": "disabled", **echo}
    if states is not None:
        text = "".join(states[0].text)
        incomplete = states[0].finish_reason == "length"
        obj.update(status="incomplete" if incomplete else "completed", output_text=text, usage=usage(ctx, states),
                   output=[_message(ctx, text, "incomplete" if incomplete else "completed")],
                   incomplete_details={"reason": "max_output_tokens"} if incomplete else None)
    return obj


def make_shape(echo: dict) -> Shape:
    def result(states: list[ChoiceState], ctx: ResponseContext) -> dict:
        return response_object(ctx, echo, states)

    async def events(job: Job, ctx: ResponseContext, on_complete=None):
        seq = iter(range(1 << 62))

        def event(kind: str, **fields) -> bytes:
            data = orjson.dumps({"type": kind, "sequence_number": next(seq), **fields})
            return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        item_id, where = "msg_" + ctx.rid[5:], {"output_index": 0, "content_index": 0}
        try:
            try:
                started = response_object(ctx, echo, None)
                yield (event("response.created", response=started) + event("response.in_progress", response=started)
                       + event("response.output_item.added", output_index=0, item=_message(ctx, None, "in_progress"))
                       + event("response.content_part.added", item_id=item_id, **where, part=_part("")))
                while (deltas := await job.next()) is not None:
                    text = "".join(d.text for d in deltas)
                    if text:
                        yield event("response.output_text.delta", item_id=item_id, **where, delta=text, logprobs=[])
                final = response_object(ctx, echo, job.states)
                text = final["output_text"]
                yield (event("response.output_text.done", item_id=item_id, **where, text=text, logprobs=[])
                       + event("response.content_part.done", item_id=item_id, **where, part=_part(text))
                       + event("response.output_item.done", output_index=0, item=final["output"][0])
                       + event(f"response.{final['status']}", response=final))
            except Exception as exc:   # headers are sent: the error travels as an event
                error = from_exception(exc)
                yield event("error", code=error.code, message=error.message, param=error.param)
        finally:
            job.close()
    return Shape(events, result)


async def responses_route(pipe, request, body: dict):
    arrival = time.monotonic()
    req, echo = parse(body, pipe.info)
    pipe.check_alive()
    try:
        prompt = await pipe.encode_chat(req.messages)
        job, ctx = pipe.admit(request, req, [prompt], "input", arrival, "resp")
    except APIError as exc:
        raise rename(exc) from None
    ctx.rid = "resp_" + uuid.uuid4().hex   # the Responses API's id style (resp_..., msg_...)
    return await pipe.run(request, req, job, ctx, make_shape(echo))
