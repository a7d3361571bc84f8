"""SamplingBatch: one step's SamplingParams gathered into tensors, once per step.

The only Python loop over sequences in sampling. A feature no row uses is left as None, and
the sampler skips that stage entirely. Gathering is per row and all-or-nothing: a row whose
parameters cannot be read (a bug, or a caller that bypassed validation) is recorded in
`failed` with neutral greedy values in its columns, so one request cannot break the step of
the others. `select(rows)` rebuilds the batch for a subset of rows, for the sampler's
per-row repair path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain

import torch

from gateway.scheduler.sequence import Sequence

log = logging.getLogger("gateway.sampling")

# Below this a temperature is greedy: dividing logits by it overflows float32.
GREEDY_EPS = 1e-5
_U64 = (1 << 64) - 1
GATHER_FAILED = "this request's sampling parameters could not be applied"
GRAMMAR_FAILED = "this request's grammar could not be applied"
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor = None


@dataclass
class _Columns:
    """Per-row values filled by the one Python loop over the batch."""
    greedy: list[bool] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    logprobs: list[int | None] = field(default_factory=list)
    # Sparse entries, each starting with its row:
    bias: list[tuple[int, int, float]] = field(default_factory=list)   # (row, token, value)
    banned: list[tuple[int, int]] = field(default_factory=list)        # (row, token)
    counted: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, output ids)
    seen: list[tuple[int, list[int]]] = field(default_factory=list)     # (row, prompt+output ids)
    seeds: list[tuple[int, int]] = field(default_factory=list)          # (row, generator seed)
    grammar: list[tuple[int, object]] = field(default_factory=list)     # (row, GrammarState)

    PER_ROW = ("greedy", "temperature", "top_k", "top_p", "min_p", "presence", "frequency",
               "repetition", "logprobs")
    ENTRIES = ("bias", "banned", "counted", "seen", "seeds", "grammar")

    def add(self, row: int, seq: Sequence, vocab_size: int, eos: set[int]) -> None:
        """Everything is computed before anything is appended, so a row that raises leaves
        the columns as they were."""
        p = seq.params
        greedy = p.temperature < GREEDY_EPS
        values = (greedy, 1.0 if greedy else float(p.temperature),
                  int(p.top_k) if 0 < p.top_k < vocab_size else vocab_size,
                  float(p.top_p), float(p.min_p), float(p.presence_penalty), float(p.frequency_penalty),
                  float(p.repetition_penalty), None if p.logprobs is None else int(p.logprobs))
        # Out-of-range ids are dropped rather than crash the whole step; the API validates.
        bias = [(row, int(t), float(v)) for t, v in p.logit_bias.items() if 0 <= int(t) < vocab_size]
        banned = []
        if seq.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
            banned = [(row, t) for t in stops if 0 <= t < vocab_size]
        counted = [(row, seq.output_token_ids)] if p.presence_penalty or p.frequency_penalty else []
        seen = [(row, seq.token_ids)] if p.repetition_penalty != 1.0 else []
        # hash of a tuple of ints is stable across processes (no PYTHONHASHSEED salt).
        seeds = [(row, hash((p.seed, seq.num_output_tokens)) & _U64)] if p.seed is not None and not greedy else []
        grammar = []
        if seq.grammar is not None:
            if seq.grammar.consumed != seq.num_output_tokens:
                seq.grammar.sync(seq.output_token_ids)
            grammar = [(row, seq.grammar)]
        for name, value in zip(self.PER_ROW, values):
            getattr(self, name).append(value)
        for name, entries in zip(self.ENTRIES, (bias, banned, counted, seen, seeds, grammar)):
            getattr(self, name).extend(entries)

    def add_neutral(self, vocab_size: int) -> None:
        """A greedy row with every feature off (for a row whose parameters failed)."""
        for name, value in zip(self.PER_ROW, (True, 1.0, vocab_size, 1.0, 0.0, 0.0, 0.0, 1.0, None)):
            getattr(self, name).append(value)

    def subset(self, rows: list[int]) -> _Columns:
        """The columns of `rows` only, renumbered 0..len(rows)-1 in that order."""
        new_row = {r: i for i, r in enumerate(rows)}
        out = _Columns()
        for name in self.PER_ROW:
            column = getattr(self, name)
            setattr(out, name, [column[r] for r in rows])
        for name in self.ENTRIES:
            setattr(out, name, [(new_row[e[0]], *e[1:]) for e in getattr(self, name) if e[0] in new_row])
        return out


def _column(values: list, neutral, dtype, device) -> torch.Tensor | None:
    """[B, 1] tensor of `values`, or None when every row holds the neutral value."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _sparse(entries: list[tuple], device) -> tuple[torch.Tensor, ...] | None:
    """(rows, tokens[, values]) tensors from (row, token[, value]) entries; None if empty."""
    if not entries:
        return None
    dtypes = (torch.long, torch.long, torch.float32)
    return tuple(torch.tensor(col, dtype=dt, device=device) for col, dt in zip(zip(*entries), dtypes))


def _token_counts(rows_tokens: list[tuple[int, list[int]]], shape, device) -> torch.Tensor:
    """[B, V] float32: how often each token occurs in each listed row (others stay zero)."""
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    tokens = torch.tensor(list(chain.from_iterable(t for _, t in rows_tokens)), dtype=torch.long)
    lengths = torch.tensor([len(t) for _, t in rows_tokens])
    rows = torch.repeat_interleave(torch.tensor([r for r, _ in rows_tokens]), lengths)
    flat = (rows * shape[1] + tokens).to(device)
    counts.view(-1).scatter_add_(0, flat, torch.ones(flat.shape, device=device))
    return counts


def grammar_mask(states: list, vocab_size: int, device) -> torch.Tensor:
    """[G, V] bool, True where each state's grammar allows the token: one llguidance call
    fills every row's bitmask (in parallel, GIL released), unpacked in one vector op."""
    global _executor
    if _executor is None:
        from llguidance import LLExecutor
        _executor = LLExecutor()
    words = (vocab_size + 31) // 32
    bitmask = torch.empty((len(states), words), dtype=torch.int32)
    _executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)],
                                      bitmask.data_ptr(), words * 4, len(states))
    bitmask = bitmask.to(device)
    bits = (bitmask.unsqueeze(-1) >> _BIT_SHIFTS.to(device)) & 1
    return bits.view(len(states), -1)[:, :vocab_size].bool()


def _grammar_allowed(cols: _Columns, vocab_size: int, device, failed: dict[int, str]) -> torch.Tensor | None:
    """The grammar rows' masks (None when no row has a grammar). If llguidance raises, the
    grammar rows alone are failed and sample unconstrained (their tokens are void)."""
    if not cols.grammar:
        return None
    try:
        return grammar_mask([state for _, state in cols.grammar], vocab_size, device)
    except Exception:
        log.exception("computing the grammar masks failed; those requests alone are failed")
        failed.update({row: GRAMMAR_FAILED for row, _ in cols.grammar})
        cols.grammar = []
        return None


@dataclass
class SamplingBatch:
    num_rows: int
    vocab_size: int
    greedy: torch.Tensor                  # [B] bool
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor | None      # [B, 1]; 1.0 on greedy rows
    top_k: torch.Tensor | None            # [B, 1] long; vocab_size where disabled
    max_top_k: int                        # largest enabled top_k, 0 when none
    top_p: torch.Tensor | None            # [B, 1]
    min_p: torch.Tensor | None            # [B, 1]
    presence: torch.Tensor | None         # [B, 1]
    frequency: torch.Tensor | None        # [B, 1]
    counts: torch.Tensor | None           # [B, V] output-token counts (presence/frequency rows)
    repetition: torch.Tensor | None       # [B, 1]
    seen: torch.Tensor | None             # [B, V] bool, prompt+output (repetition rows)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # rows, tokens, values
    banned: tuple[torch.Tensor, torch.Tensor] | None                # rows, tokens → -inf
    seeds: list[tuple[int, int]]
    allowed: torch.Tensor | None          # [G, V] bool: the grammar rows' allowed tokens
    grammar_index: torch.Tensor | None    # [G] long: which rows those are
    logprobs: list[int | None]            # per row: k alternatives, or None
    logprob_rows: list[int]               # rows that asked, in order
    logprob_index: torch.Tensor | None    # the same, on the device
    columns: _Columns                     # the host values, for select()
    device: torch.device | str
    failed: dict[int, str] = field(default_factory=dict)   # row → why its parameters failed

    @property
    def mutates_logits(self) -> bool:
        return any(x is not None for x in (self.allowed, self.bias, self.banned, self.repetition,
                                           self.presence, self.frequency))

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, eos_token_ids: set[int], device) -> SamplingBatch:
        cols, failed = _Columns(), {}
        for row, seq in enumerate(seqs):
            try:
                cols.add(row, seq, vocab_size, eos_token_ids)
            except Exception:
                log.exception("request %s: its sampling parameters failed; it alone is failed",
                              getattr(seq, "request_id", "?"))
                cols.add_neutral(vocab_size)
                failed[row] = GATHER_FAILED
        return cls.from_columns(cols, vocab_size, device, failed)

    def select(self, rows: list[int]) -> SamplingBatch:
        """The batch of `rows` alone (same seeds, same token history), renumbered."""
        new_row = {r: i for i, r in enumerate(rows)}
        failed = {new_row[r]: why for r, why in self.failed.items() if r in new_row}
        return self.from_columns(self.columns.subset(rows), self.vocab_size, self.device, failed)

    @classmethod
    def from_columns(cls, cols: _Columns, vocab_size: int, device, failed: dict[int, str]) -> SamplingBatch:
        shape, f32 = (len(cols.greedy), vocab_size), torch.float32
        repetition = _column(cols.repetition, 1.0, f32, device)
        counts = _token_counts(cols.counted, shape, device) if cols.counted else None
        asked = [r for r, k in enumerate(cols.logprobs) if k is not None]
        return cls(
            num_rows=shape[0], vocab_size=vocab_size,
            greedy=torch.tensor(cols.greedy, dtype=torch.bool, device=device),
            all_greedy=all(cols.greedy), any_greedy=any(cols.greedy),
            temperature=_column(cols.temperature, 1.0, f32, device),
            top_k=_column(cols.top_k, vocab_size, torch.long, device),
            max_top_k=max((k for k in cols.top_k if k < vocab_size), default=0),
            top_p=_column(cols.top_p, 1.0, f32, device),
            min_p=_column(cols.min_p, 0.0, f32, device),
            presence=_column(cols.presence, 0.0, f32, device),
            frequency=_column(cols.frequency, 0.0, f32, device),
            counts=counts,
            repetition=repetition,
            seen=_token_counts(cols.seen, shape, device) > 0 if repetition is not None else None,
            bias=_sparse(cols.bias, device), banned=_sparse(cols.banned, device),
            seeds=cols.seeds, logprobs=cols.logprobs,
            allowed=_grammar_allowed(cols, vocab_size, device, failed),
            grammar_index=torch.tensor([r for r, _ in cols.grammar], dtype=torch.long, device=device)
            if cols.grammar else None,
            logprob_rows=asked,
            logprob_index=torch.tensor(asked, dtype=torch.long, device=device) if asked else None,
            columns=cols, device=device, failed=failed,
        )
