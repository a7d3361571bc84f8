"""Sampler: one step's logits [B, V] → one token per row, plus logprobs where asked.

Owns two things:
  * SamplingBatch — the rows' SamplingParams gathered into tensors once per step (the
    only Python loop over sequences). A feature no row uses is left as None, and the
    sampler skips that stage entirely.
  * Sampler — vectorized over the batch, never mutating the caller's logits. In order:
      logit_bias → min_tokens mask → repetition penalty → presence/frequency penalty
      → logprobs taken → greedy rows: argmax
      → temperature → top-k / top-p (one threshold per row) → min-p → draw
    then exactly ONE device-to-host copy of everything the host needs.

Logprobs are log_softmax of the logits after bias, penalties and the min_tokens mask,
before temperature and truncation: the model's distribution as the request shaped it,
not the tempered/truncated one the token was drawn from, so they stay comparable across
temperatures (as OpenAI reports them).

The draw never syncs (no torch.multinomial): on accelerators an exponential race,
argmax(p / q) with q ~ Exp(1); on CPU, where V random numbers per row are the dominant
cost, one uniform per row against the running sum. Either way a seeded row's randomness
comes from a generator seeded by (seed, output position) alone, so it gives the same
tokens whatever shares its batch, and again after preemption and recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from gateway.sampling.logprobs import TokenLogprob
from gateway.scheduler.sequence import Sequence

# Below this a temperature is greedy: dividing logits by it overflows float32.
GREEDY_EPS = 1e-5
# On CPU, top-p is first resolved among the top-`_CANDIDATES` logits (see _cpu_thresholds).
_CANDIDATES = 256
_U64 = (1 << 64) - 1


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # per row; None where the row did not ask


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
    bias: list[tuple[int, int, float]] = field(default_factory=list)   # (row, token, value)
    banned: list[tuple[int, int]] = field(default_factory=list)        # (row, token)
    counted: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, output ids)
    seen: list[tuple[int, list[int]]] = field(default_factory=list)     # (row, prompt+output ids)
    seeds: list[tuple[int, int]] = field(default_factory=list)          # (row, generator seed)
    logprobs: list[int | None] = field(default_factory=list)

    def add(self, row: int, seq: Sequence, vocab_size: int, eos: set[int]) -> None:
        p = seq.params
        greedy = p.temperature < GREEDY_EPS
        self.greedy.append(greedy)
        self.temperature.append(1.0 if greedy else p.temperature)
        self.top_k.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
        self.top_p.append(p.top_p)
        self.min_p.append(p.min_p)
        self.presence.append(p.presence_penalty)
        self.frequency.append(p.frequency_penalty)
        self.repetition.append(p.repetition_penalty)
        self.logprobs.append(p.logprobs)
        # Out-of-range ids are dropped rather than crash the whole step; the API validates.
        self.bias += [(row, int(t), float(v)) for t, v in p.logit_bias.items() if 0 <= int(t) < vocab_size]
        if seq.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
            self.banned += [(row, t) for t in stops if 0 <= t < vocab_size]
        if p.presence_penalty or p.frequency_penalty:
            self.counted.append((row, seq.output_token_ids))
        if p.repetition_penalty != 1.0:
            self.seen.append((row, seq.token_ids))
        if p.seed is not None and not greedy:
            # hash of a tuple of ints is stable across processes (no PYTHONHASHSEED salt).
            self.seeds.append((row, hash((p.seed, seq.num_output_tokens)) & _U64))


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
    logprobs: list[int | None]            # per row: k alternatives, or None
    logprob_rows: list[int]               # rows that asked, in order
    logprob_index: torch.Tensor | None    # the same, on the device

    @property
    def mutates_logits(self) -> bool:
        return any(x is not None for x in (self.bias, self.banned, self.repetition, self.presence, self.frequency))

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, eos_token_ids: set[int], device) -> SamplingBatch:
        cols = _Columns()
        for row, seq in enumerate(seqs):
            cols.add(row, seq, vocab_size, eos_token_ids)
        shape, f32 = (len(seqs), vocab_size), torch.float32
        repetition = _column(cols.repetition, 1.0, f32, device)
        counts = _token_counts(cols.counted, shape, device) if cols.counted else None
        asked = [r for r, k in enumerate(cols.logprobs) if k is not None]
        return cls(
            num_rows=len(seqs), vocab_size=vocab_size,
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
            logprob_rows=asked,
            logprob_index=torch.tensor(asked, dtype=torch.long, device=device) if asked else None,
        )


def _process(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """bias → min_tokens → penalties, on a float32 copy (the caller's tensor is left alone)."""
    if not b.mutates_logits:
        return logits.to(torch.float32)
    logits = logits.to(torch.float32, copy=True)
    if b.bias is not None:
        logits.index_put_(b.bias[:2], b.bias[2], accumulate=True)
    if b.banned is not None:
        logits[b.banned] = float("-inf")
    if b.repetition is not None:
        # transformers semantics: shrink a seen token's logit toward "less likely" either sign.
        factor = torch.where(logits > 0, 1.0 / b.repetition, b.repetition)
        logits = torch.where(b.seen, logits * factor, logits)
    if b.presence is not None:
        logits -= b.presence * (b.counts > 0)
    if b.frequency is not None:
        logits -= b.frequency * b.counts
    return logits


def _nucleus_size(desc_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many leading (descending) tokens top-p keeps: each whose preceding mass is < p."""
    before = torch.nn.functional.pad(desc_probs.cumsum(-1)[:, :-1], (1, 0))
    return (before < top_p).sum(-1, keepdim=True).clamp_(min=1)


def _sorted_thresholds(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Exact per-row thresholds (top-k, then top-p of the top-k distribution) from a full sort."""
    desc = logits.sort(dim=-1, descending=True).values
    in_k = torch.arange(desc.shape[-1], device=desc.device) < top_k
    probs = desc.masked_fill(~in_k, float("-inf")).softmax(-1)
    # p == 1 must keep everything; float32 cumsums reach 1.0 before the tail ends.
    keep = torch.where(top_p < 1.0, torch.minimum(top_k, _nucleus_size(probs, top_p)), top_k)
    return desc.gather(1, keep - 1)


def _candidate_thresholds(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, n: int):
    """The same thresholds from the n largest logits, and the rows those cannot settle:
    top-p without top-k whose nucleus reaches past the candidates."""
    cand = logits.topk(n, dim=-1).values
    k_on, p_on = top_k < logits.shape[-1], top_p < 1.0
    keep = top_k.clamp(max=n)
    in_k = torch.arange(n, device=cand.device) < keep
    # A top-k row's whole distribution lies among the candidates; other rows need the full
    # sum (shifted by the row max, cand[:, :1]; fewer passes than torch.logsumexp on CPU).
    top = cand[:, :1]
    full_lse = top + (logits - top).exp_().sum(-1, keepdim=True).log_()
    lse = torch.where(k_on, cand.masked_fill(~in_k, float("-inf")).logsumexp(-1, keepdim=True), full_lse)
    probs = (cand - lse).exp_().masked_fill_(~in_k, 0.0)
    keep = torch.where(p_on, torch.minimum(keep, _nucleus_size(probs, top_p)), keep)
    unsettled = (p_on & ~k_on & (probs.sum(-1, keepdim=True) < top_p)).squeeze(1)
    thresholds = cand.gather(1, keep - 1).masked_fill_(~(k_on | p_on), float("-inf"))
    return thresholds, unsettled


def _cpu_thresholds(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, n: int) -> torch.Tensor:
    """Candidates first: on CPU topk(256) of [64, 49152] is ~20 ms, a sort ~130 ms. Rows
    whose nucleus reaches past them (a flat or hot distribution) retry with 16x more, and
    only what is still unsettled is sorted."""
    thresholds, unsettled = _candidate_thresholds(logits, top_k, top_p, n)
    if bool(unsettled.any()):
        rows = unsettled.nonzero().squeeze(1)
        n = min(logits.shape[-1], 16 * n)
        thresholds[rows], unsettled = _candidate_thresholds(logits[rows], top_k[rows], top_p[rows], n)
        rows = rows[unsettled]
        if len(rows):
            thresholds[rows] = _sorted_thresholds(logits[rows], top_k[rows], top_p[rows])
    return thresholds


def _truncate(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """top-k / top-p as one logit threshold per row; ties with the threshold are kept."""
    V = logits.shape[-1]
    top_k = b.top_k if b.top_k is not None else torch.full((b.num_rows, 1), V, device=logits.device)
    if b.top_p is None:   # top-k alone: the threshold is the k-th largest logit
        kth = logits.topk(b.max_top_k, dim=-1).values.gather(1, top_k.clamp(max=b.max_top_k) - 1)
        thresholds = kth.masked_fill_(top_k >= V, float("-inf"))
    elif logits.device.type == "cpu":
        thresholds = _cpu_thresholds(logits, top_k, b.top_p, min(V, max(_CANDIDATES, b.max_top_k)))
    else:   # accelerators sort fast, and choosing a fallback would sync
        thresholds = _sorted_thresholds(logits, top_k, b.top_p)
    # torch.where: ~3x faster than masked_fill here on CPU.
    return torch.where(logits < thresholds, float("-inf"), logits)


def _uniforms(b: SamplingBatch, shape: tuple[int, int], like: torch.Tensor, dtype) -> torch.Tensor:
    """U[0, 1) with `shape[1]` values per row. A seeded row's come from its own generator,
    seeded by (seed, output position) alone, so they do not depend on the batch."""
    u = torch.empty(shape, device=like.device, dtype=dtype)
    if len(b.seeds) < b.num_rows:
        u.uniform_()
    for row, seed in b.seeds:
        u[row].uniform_(generator=torch.Generator(device=like.device).manual_seed(seed))
    return u


def _race(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Exponential race, argmax(p / q) with q = -log(U) ~ Exp(1): no sync, fully parallel,
    the accelerator default. -log(U) is ~5x cheaper than exponential_() on CPU, and with U
    in [0, 1) q is never 0, so p / q has no 0/0."""
    return probs.div_(_uniforms(b, probs.shape, probs, probs.dtype).log_().neg_()).argmax(-1)


def _inverse_cdf(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """One uniform per row against the running sum, the CPU default: race noise for
    [64, 49152] costs ~20 ms of a core, this ~5 ms. The sum is float64 so tail tokens keep
    their odds, and the target stays below the total so a zero-probability token (always
    on a flat stretch of the sum) is never the first entry above it."""
    cdf = probs.to(torch.float64).cumsum_(-1)
    total = cdf[:, -1:]
    target = _uniforms(b, total.shape, probs, torch.float64).mul_(total)
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _draw(logits: torch.Tensor, b: SamplingBatch, draw: str) -> torch.Tensor:
    """temperature → top-k/top-p → min-p → one token per row from what is left."""
    if b.temperature is not None:
        logits = logits / b.temperature
    if b.top_k is not None or b.top_p is not None:
        logits = _truncate(logits, b)
    probs = logits.softmax(-1)
    if b.min_p is not None:
        probs.masked_fill_(probs < b.min_p * probs.amax(-1, keepdim=True), 0.0)
    if draw == "auto":
        draw = "inverse_cdf" if probs.device.type == "cpu" else "race"
    return _race(probs, b) if draw == "race" else _inverse_cdf(probs, b)


def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor | None, b: SamplingBatch) -> SamplerOutput:
    """One device-to-host copy: token ids, then for the asking rows the sampled token's
    logprob, the top-k ids and the top-k logprobs, flattened (float64 holds ids exactly)."""
    B, R, f64 = b.num_rows, len(b.logprob_rows), torch.float64
    k = max((b.logprobs[r] for r in b.logprob_rows), default=0)
    parts = [tokens.to(f64)]
    if logprobs is not None:
        parts.append(logprobs.gather(1, tokens[b.logprob_index].unsqueeze(1)).to(f64).flatten())
        if k:
            top = logprobs.topk(k, dim=-1)
            parts += [top.indices.to(f64).flatten(), top.values.to(f64).flatten()]
    flat = torch.cat(parts).tolist()
    ids = [int(x) for x in flat[:B]]
    out: list[TokenLogprob | None] = [None] * B
    top_ids, top_vals = flat[B + R: B + R + R * k], flat[B + R + R * k:]
    for i, row in enumerate(b.logprob_rows):
        alts = [(int(top_ids[i * k + j]), top_vals[i * k + j]) for j in range(b.logprobs[row])]
        out[row] = TokenLogprob(token_id=ids[row], logprob=flat[B + i], top=alts)
    return SamplerOutput(token_ids=ids, logprobs=out)


class Sampler:
    """Holds only how to draw; everything per step arrives in the SamplingBatch.
    draw: "race" | "inverse_cdf" | "auto" (inverse_cdf on CPU, race elsewhere)."""

    def __init__(self, draw: str = "auto"):
        if draw not in ("auto", "race", "inverse_cdf"):
            raise ValueError(f"unknown draw {draw!r}")
        self.draw = draw

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.shape == (batch.num_rows, batch.vocab_size), (tuple(logits.shape), batch.num_rows)
        logits = _process(logits, batch)
        logprobs = None
        if batch.logprob_index is not None:
            logprobs = torch.log_softmax(logits[batch.logprob_index], dim=-1)
        if batch.all_greedy:
            tokens = logits.argmax(-1)
        else:
            tokens = _draw(logits, batch, self.draw)
            if batch.any_greedy:
                tokens = torch.where(batch.greedy, logits.argmax(-1), tokens)
        return _to_host(tokens, logprobs, batch)
