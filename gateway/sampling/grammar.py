"""Grammar-constrained decoding on llguidance: compiling a request's grammar (JSON schema or
regex, lark/GBNF grammar) once per distinct source, and the per-sequence matcher state that the sampler masks by.

Why llguidance: it compiles a JSON schema in milliseconds, computes a 49,152-token mask in
~2 ms on one core (its lexer is lazy, so nothing is precomputed per vocabulary entry) and
fills a batch's masks in parallel from Rust without the GIL.

Layers: `compile_grammar` needs no tokenizer, so SamplingParams validates a schema when it is
constructed (a bad one is a 400 before tokenization). `GrammarFactory` (one per engine) holds
the llguidance tokenizer, built in a background thread at start-up (~1 s) so no step waits on
it unless a grammar request comes first, and a template matcher per grammar that new sequences
deep-copy. `GrammarState` lives on the Sequence: it advances on each accepted token and can be
rebuilt from the output tokens, which preemption by recompute keeps. Torch-free."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import lru_cache

from llguidance import LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import any_to_lark

# Compact JSON: with flexible whitespace a sampled model can pad forever between tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_TEMPLATES = 64


class GrammarError(ValueError):
    """The grammar source is invalid (bad schema, unsupported keyword, bad regex)."""


def grammar_key(json_schema=None, regex: str | None = None, lark: str | None = None,
                choice: list[str] | None = None) -> tuple[str, str] | None:
    """(kind, source text) identifying a grammar; None when unconstrained. A dict schema is
    serialized in its own key order (property order decides the order of the output); a
    choice of strings becomes a lark grammar of their literals."""
    if json_schema is not None:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema, separators=(",", ":"))
        return "json_schema", text
    if regex is not None:
        return "regex", regex
    if lark is not None:
        return "lark", lark
    if choice is not None:   # JSON string literals are lark string literals
        return "lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)
    return None


@lru_cache(maxsize=512)
def compile_grammar(kind: str, source: str) -> str:
    """The validated llguidance grammar for (kind, source); raises GrammarError."""
    try:
        if kind == "json_schema":
            grammar = LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
        elif kind == "lark":   # lark as llguidance reads it, or GBNF (llama.cpp's EBNF) converted to it
            grammar = LLMatcher.grammar_from_lark(any_to_lark(source))
        else:
            grammar = LLMatcher.grammar_from_regex(source)
    except Exception as exc:   # llguidance raises ValueError/RuntimeError on unparsable input
        raise GrammarError(str(exc)) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error)
    return grammar


class GrammarState:
    """One sequence's position in its grammar: `consumed` output tokens accepted so far."""

    __slots__ = ("matcher", "consumed", "_template")

    def __init__(self, template: LLMatcher):
        self._template = template
        self.matcher = template.deep_copy()
        self.consumed = 0

    def advance(self, token: int) -> bool:
        """Accept one sampled token; False if the grammar rejects it (the state is then in error)."""
        self.consumed += 1
        return bool(self.matcher.consume_token(token)) and not self.matcher.is_error()

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the state match the sequence's output, rebuilding it from the tokens when they
        disagree (a sequence whose output was rewritten, e.g. recomputed from fewer tokens)."""
        if self.consumed == len(output_token_ids):
            return
        self.matcher = self._template.deep_copy()
        self.matcher.consume_tokens(output_token_ids)
        self.consumed = len(output_token_ids)

    @property
    def is_stopped(self) -> bool:
        """The grammar allows nothing more but EOS: the output is complete."""
        return self.matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


class GrammarFactory:
    """Per engine: the llguidance tokenizer and a bounded cache of template matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._tokenizer: LLTokenizer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._templates: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        args = (hf_tokenizer, vocab_size, sorted(eos_token_ids))
        threading.Thread(target=self._build, args=args, name="grammar-tokenizer", daemon=True).start()

    def _build(self, hf_tokenizer, vocab_size: int, eos: list[int]) -> None:
        try:
            import llguidance.hf
            self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        except BaseException as exc:   # reported to the first grammar request, not at start-up
            self._error = exc
        finally:
            self._ready.set()

    @property
    def tokenizer(self) -> LLTokenizer:
        self._ready.wait()
        if self._tokenizer is None:
            raise GrammarError(f"this model's tokenizer cannot be used for constrained decoding: {self._error}")
        return self._tokenizer

    def new_state(self, key: tuple[str, str]) -> GrammarState:
        """A fresh state for the grammar `key` (see grammar_key); raises GrammarError."""
        grammar = compile_grammar(*key)
        with self._lock:   # the event loop (admission checks) and the engine thread both call this
            template = self._templates.get(grammar)
        if template is None:   # built outside the lock: LLMatcher releases the GIL while it compiles
            template = LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise GrammarError(template.get_error())
        with self._lock:
            self._templates[grammar] = template
            self._templates.move_to_end(grammar)
            while len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        return GrammarState(template)
