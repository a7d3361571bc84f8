"""Tool calling, output side: the generated text → content and tool calls, incrementally.

`ToolCallParser.feed(text)` takes each new piece of a reply and returns what became certain:
content text, a call's start (its id and name) and fragments of its arguments, so a stream
can send OpenAI's `delta.tool_calls` as the model writes them; `finish()` flushes the rest.
The non-streamed answer runs the same parser over the whole text at once, so the streamed
deltas reassemble to exactly the non-streamed calls. `parse(text)` is that in one call.

What is read, per CallFormat (tool_formats.py: hermes <tool_call> blocks, llama3 bare JSON
objects after an optional <|python_tag|>, mistral's [TOOL_CALLS] array): after optional
leading whitespace, the format's calls; a reply that starts otherwise is content, all of it.
Whether a prefix can still become a call is decided by partial regex matching (the `regex`
package), so nothing is emitted before it is certain. A call's arguments stream as the model
writes them: a small scanner follows JSON strings and brackets to find where the arguments
value ends (keys after it are skipped). A call object that does not open with "name" then
"arguments" (or "parameters") is parsed whole once its closing brace arrives; one that cannot
be read at all becomes content, and so does text after the calls. A reply cut off by
max_tokens keeps what it had (a call's arguments may then be incomplete JSON, as in vLLM).
Pure: no I/O."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from gateway.api.tool_formats import FORMATS, HERMES


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

    def __init__(self, depth: int = 0):
        """depth=1: the rest of an object whose "{" was already read."""
        self.depth, self.in_string, self.escaped, self.started, self.done = depth, False, False, depth > 0, False

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
    """One reply's parser for one CallFormat; `calls` and `content` hold everything read so far."""

    def __init__(self, new_id=new_call_id, fmt: str = HERMES):
        self.calls: list[ToolCall] = []
        self.content = ""
        self.format = FORMATS[fmt]
        self._new_id = new_id
        self._mode = "start"   # start | text | whole | args | tail | close | between | done
        self._buf = ""
        self._value: _ValueEnd | None = None
        self._held = ""        # whole mode: the lead and the object text read so far

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._buf and self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: text still held back is content (or dropped whitespace)."""
        events: list[Event] = []
        rest, self._buf = self._held + self._buf, ""
        if self._mode in ("start", "text", "whole") and rest or self._mode in ("between", "done") and rest.strip():
            self._content(rest, events)
        return events

    # ---- one step per state; True when it made progress and should run again ----------
    def _step(self, events: list[Event]) -> bool:
        return getattr(self, f"_{self._mode}")(events)

    def _start(self, events: list[Event]) -> bool:
        return self._next_call(events, first=True)

    def _between(self, events: list[Event]) -> bool:
        end = self.format.end_pattern()
        if end is not None:   # a closing "]" (mistral) ends the calls
            match = end.match(self._buf, partial=True)
            if match is not None and not match.partial:
                self._mode, self._buf = "done", self._buf[match.end():]
                return True
            if match is not None and not self.format.head(False).match(self._buf, partial=True):
                return False   # undecided: whitespace before the "]"
        return self._next_call(events, first=False)

    def _next_call(self, events: list[Event], first: bool) -> bool:
        """The next call's head ("name" then the arguments key), a call whose keys come in
        another order (read whole), or text: content, all of the rest."""
        match = self.format.head(first).match(self._buf, partial=True)
        if match is not None and match.partial:
            return False   # undecided: a prefix of a call
        if match is not None:
            self._open_call(json.loads(f'"{match.group(1)}"'), events)
            self._mode, self._buf, self._value = "args", self._buf[match.end():], _ValueEnd()
            return True
        lead = self.format.lead(first).match(self._buf)
        if lead is not None:
            self._mode, self._held, self._buf = "whole", self._buf[:lead.end()], self._buf[lead.end():]
            self._value = _ValueEnd()
            return True
        if not first and not self._buf.strip():
            return False
        self._mode = "text"
        return True

    def _done(self, events: list[Event]) -> bool:
        if self._buf.strip():
            self._mode = "text"
            return True
        return False

    def _text(self, events: list[Event]) -> bool:
        self._content(self._buf, events)
        self._buf = ""
        return False

    def _args(self, events: list[Event]) -> bool:
        used = self._value.take(self._buf)
        piece, self._buf = self._buf[:used], self._buf[used:]
        if piece:
            self.calls[-1].arguments += piece
            events.append(Event("arguments", piece, len(self.calls) - 1))
        if self._value.done:
            self._mode, self._value = "tail", _ValueEnd(depth=1)
            return True
        return False

    def _tail(self, events: list[Event]) -> bool:
        """The rest of the call object (keys after the arguments are skipped) up to its "}"."""
        self._buf = self._buf[self._value.take(self._buf):]
        if self._value.done:
            self._mode = "close"
            return True
        return False

    def _close(self, events: list[Event]) -> bool:
        """What ends each call (hermes: </tool_call>); text up to it is skipped."""
        if not self.format.close:
            self._mode = "between"
            return True
        end = self._buf.find(self.format.close)
        if end < 0:
            return False
        self._mode, self._buf = "between", self._buf[end + len(self.format.close):]
        return True

    def _whole(self, events: list[Event]) -> bool:
        used = self._value.take(self._buf)
        self._held, self._buf = self._held + self._buf[:used], self._buf[used:]
        if not self._value.done:
            return False
        lead_end = self._held.index("{")   # no format's lead holds a "{"
        self._whole_call(self._held[:lead_end], self._held[lead_end:], events)
        self._held = ""
        return True

    # ---- helpers -------------------------------------------------------------------------
    def _content(self, text: str, events: list[Event]) -> None:
        self.content += text
        events.append(Event("content", text))

    def _open_call(self, name: str, events: list[Event]) -> None:
        self.calls.append(ToolCall(self._new_id(), name))
        events.append(Event("call", name, len(self.calls) - 1))

    def _whole_call(self, lead: str, block: str, events: list[Event]) -> None:
        """A call object read whole: {"name", "arguments"|"parameters"} in any order, or content."""
        try:
            obj = json.loads(block)
        except ValueError:
            obj = None
        arguments = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or arguments is None:
            self._content(lead + block, events)
            self._mode = "text"
            return
        self._open_call(obj["name"], events)
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self.calls[-1].arguments = text
        events.append(Event("arguments", text, len(self.calls) - 1))
        self._mode = "close"


def parse(text: str, fmt: str = HERMES) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole reply."""
    parser = ToolCallParser(fmt=fmt)
    parser.feed(text)
    parser.finish()
    return parser.content or None, parser.calls
