"""Tool calling, output side: the generated text → content and tool calls, incrementally.

`ToolCallParser.feed(text)` takes each new piece of a reply and returns what became certain:
content text, a call's start (its id and name) and fragments of its arguments, so a stream
can send OpenAI's `delta.tool_calls` as the model writes them; `finish()` flushes the rest.
The non-streamed answer runs the same parser over the whole text at once, so the streamed
deltas reassemble to exactly the non-streamed calls. `parse(text)` is that in one call.

What is read: after optional leading whitespace, `<tool_call>` blocks (tools.py's format,
`{"name": ..., "arguments": ...}` inside); a reply that starts otherwise is content, all of
it. The arguments stream as the model writes them: a small scanner follows JSON strings and
brackets to find where the arguments value ends. A block that does not open with "name"
then "arguments" is parsed whole once its `</tool_call>` arrives ({"name", "arguments"} or
{"name", "parameters"}); one that cannot be read at all becomes content. A reply cut off by
max_tokens keeps what it had (a call's arguments may then be incomplete JSON, as in vLLM).
Pure: no I/O."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from gateway.api.tools import CALL_CLOSE, CALL_OPEN

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""   # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Event:
    """content (text) | call (index: a new call, its id and name) | arguments (index, text)."""
    kind: str
    text: str = ""
    index: int = -1


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _ValueEnd:
    """Follows one JSON value character by character; `done` once it is complete."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started, self.done = 0, False, False, False, False

    def take(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them unless it ends)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
            elif self.started and self.depth == 0 and (ch in ",}]" or ch.isspace()):   # a bare literal ended
                self.done = True
                return i
            elif ch == '"':
                self.in_string, self.started = True, True
            elif ch in "{[":
                self.depth, self.started = self.depth + 1, True
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.done = True
                    return i + 1
            elif not ch.isspace():
                self.started = True
        return len(text)


class ToolCallParser:
    """One reply's parser; `calls` and `content` hold everything read so far."""

    def __init__(self, new_id=new_call_id):
        self.calls: list[ToolCall] = []
        self.content = ""
        self._new_id = new_id
        self._mode = "start"   # start | text | head | args | tail | between
        self._buf = ""
        self._value: _ValueEnd | None = None

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._buf and self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: text still held back is content (or dropped whitespace)."""
        events: list[Event] = []
        rest, self._buf = self._buf, ""
        if self._mode == "head":
            rest = CALL_OPEN + rest
        if self._mode in ("start", "head", "text") and rest or self._mode == "between" and rest.strip():
            self._content(rest, events)
        return events

    # ---- one step per state; True when it made progress and should run again ----------
    def _step(self, events: list[Event]) -> bool:
        return getattr(self, f"_{self._mode}")(events)

    def _start(self, events: list[Event]) -> bool:
        stripped = self._buf.lstrip()
        if not stripped or CALL_OPEN.startswith(stripped):
            return False   # undecided: whitespace, or a prefix of the tag
        if stripped.startswith(CALL_OPEN):
            self._mode, self._buf = "head", stripped[len(CALL_OPEN):]
            return True
        self._mode = "text"
        return True

    _between = _start   # after a call: the next call, or (unexpectedly) text

    def _text(self, events: list[Event]) -> bool:
        self._content(self._buf, events)
        self._buf = ""
        return False

    def _head(self, events: list[Event]) -> bool:
        match = _HEAD.match(self._buf)
        if match:
            self._open_call(json.loads(f'"{match.group(1)}"'), events)
            self._mode, self._buf, self._value = "args", self._buf[match.end():], _ValueEnd()
            return True
        end = self._buf.find(CALL_CLOSE)
        if end < 0:
            return False
        block, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE):]
        self._whole_block(block, events)
        return True

    def _args(self, events: list[Event]) -> bool:
        used = self._value.take(self._buf)
        piece, self._buf = self._buf[:used], self._buf[used:]
        if piece:
            self.calls[-1].arguments += piece
            events.append(Event("arguments", piece, len(self.calls) - 1))
        if self._value.done:
            self._mode = "tail"
            return True
        return False

    def _tail(self, events: list[Event]) -> bool:
        end = self._buf.find(CALL_CLOSE)
        if end < 0:
            return False
        self._mode, self._buf = "between", self._buf[end + len(CALL_CLOSE):]
        return True

    # ---- helpers -------------------------------------------------------------------------
    def _content(self, text: str, events: list[Event]) -> None:
        self.content += text
        events.append(Event("content", text))

    def _open_call(self, name: str, events: list[Event]) -> None:
        self.calls.append(ToolCall(self._new_id(), name))
        events.append(Event("call", name, len(self.calls) - 1))

    def _whole_block(self, block: str, events: list[Event]) -> None:
        try:
            obj = json.loads(block)
        except ValueError:
            obj = None
        arguments = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or arguments is None:
            self._content(f"{CALL_OPEN}{block}{CALL_CLOSE}", events)
            self._mode = "text"
            return
        self._open_call(obj["name"], events)
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self.calls[-1].arguments = text
        events.append(Event("arguments", text, len(self.calls) - 1))
        self._mode = "between"


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole reply."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser.content or None, parser.calls
