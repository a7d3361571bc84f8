"""Tool-call output formats: which one a chat template teaches its model, the patterns the
parser (tool_calls.py) reads it by, and the lark pieces the grammar (tools.py) writes it with.

    hermes   <tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>   one block per call,
             newline-separated (Hermes, Qwen2.5; also our preamble for templates without tools)
    llama3   {"name": N, "parameters": {...}}   calls separated by "; ", optionally after
             <|python_tag|> (Llama 3.1-3.3's JSON tool calling)
    mistral  [TOOL_CALLS][{"name": N, "arguments": {...}}, ...]   one JSON array (Mistral v3)

`detect(template)` picks one from the template text, as vLLM's `--tool-call-parser` would be
chosen for that model: a template that reads `tools` and mentions [TOOL_CALLS] is mistral,
one that mentions <tool_call> is hermes, one that mentions <|python_tag|> (or ipython and
"parameters") is llama3; anything else, including a template without tools, is hermes.
The parser accepts "arguments" or "parameters" in every format; the grammar writes the key the
format's template uses. The grammar spells the [TOOL_CALLS] marker as text (its token id is
unknown when a request is parsed; llguidance then keeps the special token out) and writes
llama3 calls bare, without <|python_tag|>, which Llama's own parser reads too; so the markers
reach the parser as text, whatever skip_special_tokens says. Pure data, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

import regex   # partial matching: whether a prefix of the reply can still become a call

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
# a call object up to its arguments value: {"name": "N", "arguments": (group 1: the name)
_HEAD = r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'


@dataclass(frozen=True)
class CallFormat:
    name: str
    first_lead: str       # regex: the reply's start up to the first call's "{"
    next_lead: str        # regex: after a call (and its close) up to the next call's "{"
    close: str            # literal after each call object ("" when none)
    end: str              # regex: after the last call ("" when nothing closes the calls)
    arguments_key: str    # what the grammar writes
    grammar_open: str     # lark literals: before the first call, before each, after each, between
    grammar_call_open: str
    grammar_call_close: str
    grammar_separator: str
    grammar_close: str
    text_start: str       # lark character class a plain-text answer may start with (under `auto`)

    def head(self, first: bool) -> regex.Pattern:
        return _compiled((self.first_lead if first else self.next_lead) + _HEAD)

    def lead(self, first: bool) -> regex.Pattern:
        return _compiled((self.first_lead if first else self.next_lead) + r"(?=\{)")

    def end_pattern(self) -> regex.Pattern | None:
        return _compiled(self.end) if self.end else None


_PATTERNS: dict[str, regex.Pattern] = {}


def _compiled(pattern: str) -> regex.Pattern:
    if pattern not in _PATTERNS:
        _PATTERNS[pattern] = regex.compile(pattern)
    return _PATTERNS[pattern]


FORMATS = {
    HERMES: CallFormat(HERMES, r"\s*<tool_call>\s*", r"\s*<tool_call>\s*", "</tool_call>", "", "arguments",
                       "", "<tool_call>\\n", "\\n</tool_call>", "\\n", "", "[^<]"),
    LLAMA3: CallFormat(LLAMA3, r"\s*(?:<\|python_tag\|>\s*)?", r"\s*;\s*", "", "", "parameters",
                       "", "", "", "; ", "", "[^{<]"),
    MISTRAL: CallFormat(MISTRAL, r"\s*\[TOOL_CALLS\]\s*\[\s*", r"\s*,\s*", "", r"\s*\]", "arguments",
                        "[TOOL_CALLS][", "", "", ", ", "]", "[^\\[]"),
}


def detect(template: str | None) -> str:
    """The tool-call format a chat template asks its model for (hermes when it names none)."""
    if not template or re.search(r"\btools\b", template) is None:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3
    return HERMES
