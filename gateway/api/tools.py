"""Tool calling, request side: `tools` / `tool_choice` / `parallel_tool_calls` → a ToolSpec;
the message fields that carry past tool calls and tool results; rendering both for the chat
template; and the lark grammar that constrains a reply to tool calls.

The call format is by default Hermes-style (what Qwen2.5 and Hermes templates teach their
models, and what tool_calls.py parses back):
    <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>
one block per call, separated by a newline; a template that teaches Llama 3's JSON calls or
Mistral's [TOOL_CALLS] gets that format instead (tool_formats.py; ToolSpec.format). A
template that reads the `tools` variable (`template_uses_tools`) gets the tools and the
messages in transformers' form; for one that does not (SmolLM2's), the tools are described
in a system preamble (as vLLM and llama.cpp do for such templates), past calls are written
into the assistant's content in the same format and tool results become user turns wrapped
in <tool_response>.

Grammar per choice: `required` → one or more calls (one when parallel_tool_calls is false),
each call's JSON fixed to a known name and that function's `parameters` schema; a named
choice → one call of that function; `auto` → either free text that does not start like a
call (hermes: `<`, llama3: `{` or `<`, mistral: `[`) or those calls; `none` → no tools in the prompt and no grammar (a plain answer).

For a route: `parse_tools(body)` → ToolSpec or None; `message_fields(...)` per input message;
`render(messages, spec, template_uses_tools(template))` → (messages, tools for the template);
`SamplingParams(grammar=spec.grammar())`; the reply through tool_calls.ToolCallParser.
Pure: no I/O, no engine calls."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.api.errors import invalid
from gateway.api.tool_formats import FORMATS, HERMES
from gateway.sampling.grammar import GrammarError, compile_grammar

FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
MAX_TOOLS = 128
MAX_PARAMETERS_BYTES = 64 * 1024      # all tools' schemas together: compiled on the event loop
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names
_CHOICES = ("none", "auto", "required")
_NO_ARGUMENTS = {"type": "object", "properties": {}}
PREAMBLE = (
    "You may call one or more functions to assist with the user query. You are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict

    def openai(self) -> dict:
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[Tool, ...]
    choice: str            # none | auto | required | the name of the one function to call
    parallel: bool = True
    format: str = HERMES   # the call format (tool_formats.py) the template teaches its model

    @property
    def active(self) -> bool:
        """Tools are offered (rendered into the prompt, the reply parsed for calls)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """The reply must be tool calls (required or a named function)."""
        return self.active and self.choice != "auto"

    def grammar(self) -> str | None:
        """The lark grammar constraining the reply to calls in this spec's format (tool_formats.py);
        None for `none`."""
        if not self.active:
            return None
        fmt = FORMATS[self.format]
        offered = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        def lit(text: str) -> str:   # a lark literal, or nothing for ""
            return f'"{text}" ' if text else ""
        rules = [f"call_{i}: {lit(fmt.grammar_call_open)}%json {json.dumps(call_schema(t, fmt.arguments_key))} "
                 f"{lit(fmt.grammar_call_close)}".rstrip() for i, t in enumerate(offered)]
        several = self.parallel and self.choice in ("auto", "required")
        calls = f'call ({lit(fmt.grammar_separator)}call)*' if several else "call"
        start = "start: TEXT | calls" if self.choice == "auto" else "start: calls"
        lines = [start, f"calls: {lit(fmt.grammar_open)}{calls} {lit(fmt.grammar_close)}".rstrip(),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(offered))), *rules]
        if self.choice == "auto":
            lines.append(f"TEXT: /{fmt.text_start}(.|\\n)*/")
        return "\n".join(lines) + "\n"


def call_schema(tool: Tool, arguments_key: str = "arguments") -> dict:
    """The JSON of one call: {"name": its name, arguments_key: its parameters}, compact."""
    schema = {"x-guidance": {"whitespace_flexible": False}, "type": "object",
              "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
              "required": ["name", arguments_key], "additionalProperties": False}
    for defs in ("$defs", "definitions"):   # "#/$defs/..." refs resolve against the root
        if isinstance(tool.parameters.get(defs), dict):
            schema[defs] = tool.parameters[defs]
    return schema


def _tool(i: int, entry) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
        raise invalid(where, f"`{where}` must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
    if set(entry) - {"type", "function"}:
        raise invalid(where, f"`{where}` has unsupported fields {sorted(set(entry) - {'type', 'function'})}")
    fn = entry["function"]
    extra = set(fn) - {"name", "description", "parameters", "strict"}
    if extra:
        raise invalid(f"{where}.function", f"`{where}.function` has unsupported fields {sorted(extra)}")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(f"{where}.function.name", f"`{where}.function.name` must be 1-64 letters, digits, _ or -")
    for key, kind in (("description", str), ("strict", bool)):
        if fn.get(key) is not None and not isinstance(fn[key], kind):
            raise invalid(f"{where}.function.{key}", f"`{where}.function.{key}` must be a {kind.__name__}",
                          code="invalid_type")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = _NO_ARGUMENTS
    if not isinstance(parameters, dict):
        raise invalid(f"{where}.function.parameters", f"`{where}.function.parameters` must be a JSON schema object")
    tool = Tool(name, fn.get("description"), parameters)
    try:   # cached by source: the grammar built from it later compiles this part again cheaply
        compile_grammar("json_schema", json.dumps(call_schema(tool)))
    except GrammarError as exc:
        raise invalid(f"{where}.function.parameters", f"`{where}.function.parameters` is not a usable JSON "
                                                      f"schema: {exc}") from None
    return tool


def _choice(value, tools: tuple[Tool, ...]) -> str:
    if value is None:
        return "auto" if tools else "none"
    if not tools and value != "none":
        raise invalid("tool_choice", "`tool_choice` is only allowed when `tools` are given")
    if isinstance(value, str):
        if value not in _CHOICES:
            raise invalid("tool_choice", f"`tool_choice` must be one of {list(_CHOICES)} or "
                                         f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {value!r}")
        return value
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", "`tool_choice` must be a string or {\"type\": \"function\", "
                                     "\"function\": {\"name\": ...}}")
    if name not in {t.name for t in tools}:
        raise invalid("tool_choice", f"`tool_choice` names the function {name!r}, which is not in `tools`")
    return name


def parse_tools(body: dict, fmt: str = HERMES) -> ToolSpec | None:
    """The request's ToolSpec (calls in format `fmt`), or None when it sends none of FIELDS
    (null counts as absent)."""
    if all(body.get(name) is None for name in FIELDS):
        return None
    raw = body.get("tools")
    if raw is not None and (not isinstance(raw, list) or not raw):
        raise invalid("tools", "`tools` must be a non-empty array of functions")
    if raw is not None and len(raw) > MAX_TOOLS:
        raise invalid("tools", f"`tools` has {len(raw)} entries, more than {MAX_TOOLS}", code="array_above_max_length")
    if raw is not None and len(json.dumps(raw)) > MAX_PARAMETERS_BYTES:
        raise invalid("tools", f"`tools` is more than {MAX_PARAMETERS_BYTES} bytes of JSON", code="grammar_too_large")
    tools = tuple(_tool(i, t) for i, t in enumerate(raw or ()))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools", f"`tools` names a function twice: {sorted({n for n in names if names.count(n) > 1})}")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "`parallel_tool_calls` must be a boolean", code="invalid_type")
    return ToolSpec(tools, _choice(body.get("tool_choice"), tools), True if parallel is None else parallel, fmt)


MESSAGE_FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}   # beyond role and content


def message_fields(where: str, role: str, message: dict) -> dict:
    """The tool fields of one input message, checked: a tool result's `tool_call_id`, an
    assistant turn's `tool_calls` [{id, type: function, function: {name, arguments}}]."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.tool_call_id", f"`{where}` has role tool: it needs a `tool_call_id` string")
        return {"tool_call_id": call_id}
    calls = message.get("tool_calls")
    if role != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list) or not calls or len(calls) > MAX_TOOLS:
        raise invalid(f"{where}.tool_calls", f"`{where}.tool_calls` must be an array of 1 to {MAX_TOOLS} calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        ok = (isinstance(fn, dict) and call.get("type", "function") == "function" and isinstance(call.get("id"), str)
              and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str))
        if not ok:
            raise invalid(f"{where}.tool_calls[{j}]", f"`{where}.tool_calls[{j}]` must be {{\"id\", \"type\": "
                                                      "\"function\", \"function\": {\"name\", \"arguments\": a JSON string}}")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return {"tool_calls": out}


def template_uses_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (then it renders tools itself)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _arguments(text: str):
    """A call's arguments as an object where they parse (what templates with tools expect)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_text(call: dict) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": _arguments(fn["arguments"])}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _plain(message: dict) -> dict:
    """A message for a template without tool support: calls and results as text."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if message.get("tool_calls"):
        texts = [message["content"]] if message["content"] else []
        return {"role": "assistant", "content": "\n".join(texts + [_call_text(c) for c in message["tool_calls"]])}
    return message


def _structured(message: dict, names: dict[str, str]) -> dict:
    """A message in transformers' tool form: arguments as objects, tool results named."""
    if message["role"] == "tool":
        out = {**message}
        if message["tool_call_id"] in names:
            out["name"] = names[message["tool_call_id"]]
        return out
    if message.get("tool_calls"):
        calls = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in message["tool_calls"]]
        return {**message, "tool_calls": calls}
    return message


def render(messages: list[dict], spec: ToolSpec | None, uses_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages for the chat template, the `tools` to pass it or None)."""
    offered = [t.openai() for t in spec.tools] if spec is not None and spec.active else None
    if uses_tools:
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
        return [_structured(m, names) for m in messages], offered
    rendered = [_plain(m) for m in messages]
    if offered:
        preamble = PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in offered))
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{preamble}"}
        else:
            rendered.insert(0, {"role": "system", "content": preamble})
    return rendered, None
