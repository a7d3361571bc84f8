"""SamplingParams: what one request asks of generation. Validated on construction so
that every layer above (HTTP, Python API) gets the same errors for the same mistakes.

Every float has a finite range, chosen where a value outside it has no sane meaning and would
overflow float32 in the sampler (1e39 is inf there; 1e-46 is 0): temperature [0, 100] (beyond
~10 the draw is already near-uniform), repetition_penalty [0.01, 100] (a factor of 100 either
way leaves logits far from overflow), presence/frequency penalties [-2, 2] and logit_bias
values [-100, 100] (OpenAI's ranges). The sampler still guards against non-finite logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateway.sampling.grammar import GrammarError, compile_grammar, grammar_key

MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)
_CONSTRAINTS = ("json_schema", "regex", "grammar", "choice")   # at most one per request


def _within(value, low: float, high: float) -> bool:
    """low <= value <= high for a finite number (NaN and ±inf fail)."""
    return math.isfinite(value) and low <= value <= high


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0           # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0                     # 0 (or -1) → disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0      # OpenAI: additive, once per present token
    frequency_penalty: float = 0.0     # OpenAI: additive, times the count in the output
    repetition_penalty: float = 1.0    # transformers: multiplicative over prompt+output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # None → no logprobs; k → sampled token + top-k alternatives
    skip_special_tokens: bool = True
    # Constrained decoding (sampling/grammar.py): at most one of them.
    json_schema: dict | str | None = None   # a JSON schema (dict or its JSON text)
    regex: str | None = None
    grammar: str | None = None              # a lark grammar (llguidance's dialect) or GBNF
    choice: list[str] | None = None         # exactly one of these strings

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k < 0:
            self.top_k = 0
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (_within(self.temperature, 0, MAX_TEMPERATURE), "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (_within(self.presence_penalty, -2, 2), "presence_penalty", "must be in [-2, 2]"),
            (_within(self.frequency_penalty, -2, 2), "frequency_penalty", "must be in [-2, 2]"),
            (_within(self.repetition_penalty, *REPETITION_PENALTY_RANGE), "repetition_penalty",
             "must be in [{:g}, {:g}]".format(*REPETITION_PENALTY_RANGE)),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(_within(v, -100, 100) for v in self.logit_bias.values()), "logit_bias", "values must be in [-100, 100]"),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {message}")
        self._check_grammar()

    def _check_grammar(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise SamplingParamsError(given[1], f"{' and '.join(given)} cannot be combined")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise SamplingParamsError("json_schema", "json_schema must be a JSON schema object or its JSON text")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingParamsError(name, f"{name} must be a string")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("choice", "choice must be a non-empty list of non-empty strings")
        key = self.grammar_key
        if key is not None:
            try:
                compile_grammar(*key)   # cached: replace() per choice compiles nothing again
            except GrammarError as exc:
                raise SamplingParamsError(given[0], f"invalid {given[0]}: {exc}") from None

    @property
    def grammar_key(self) -> tuple[str, str] | None:
        """(kind, source) of the grammar constraining this request, or None."""
        return grammar_key(self.json_schema, self.regex, self.grammar, self.choice)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingParamsError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
