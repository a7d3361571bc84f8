"""Sampler: one step's logits [B, V] → one token per row, plus logprobs where asked.

Vectorized over the batch (the rows' parameters arrive gathered in a SamplingBatch, see
batch.py), never mutating the caller's logits. In order:
    grammar mask → logit_bias → min_tokens mask → repetition penalty → presence/frequency penalty
    → logprobs taken → greedy rows: argmax
    → temperature → top-k / top-p (one threshold per row) → min-p → draw
then exactly ONE device-to-host copy of everything the host needs.

Logprobs are log_softmax of the logits after the grammar mask, bias, penalties and the min_tokens mask,
before temperature and truncation: the model's distribution as the request shaped it,
not the tempered/truncated one the token was drawn from, so they stay comparable across
temperatures (as OpenAI reports them).

The draw never syncs (no torch.multinomial): on accelerators an exponential race,
argmax(p / q) with q ~ Exp(1); on CPU, where V random numbers per row are the dominant
cost, one uniform per row against the running sum. Either way a seeded row's randomness
comes from a generator seeded by (seed, output position) alone, so it gives the same
tokens whatever shares its batch, and again after preemption and recompute.

No row can hurt another (guards.py has the numerics): the fast path checks each row's pick
for O(B) (the chosen logit finite on greedy rows; the chosen token's probability > 0 and the
id inside [0, V) on sampled rows, which a NaN, +inf or all -inf row cannot pass because its
softmax is all NaN). Only the rows that fail are sampled again, alone, in safe mode (NaN →
-inf, +inf → the largest float, after every stage), and a row left without a finite
candidate takes the argmax of its processed logits, else of the raw model logits. If the
batched call raises, every row is sampled alone, and a row that raises by itself is
reported in SamplerOutput.failed; the others keep their tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from gateway.sampling.batch import GREEDY_EPS, SamplingBatch   # noqa: F401  (re-exported)
from gateway.sampling.guards import drawn_ok, fallback_tokens, greedy_ok, sanitize_
from gateway.sampling.logprobs import TokenLogprob

log = logging.getLogger("gateway.sampling")

# On CPU, top-p is first resolved among the top-`_CANDIDATES` logits (see _cpu_thresholds).
_CANDIDATES = 256
SAMPLING_FAILED = "sampling failed for this request"


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # per row; None where the row did not ask
    failed: dict[int, str] = field(default_factory=dict)   # row → client-facing reason; its token is void


def _process(logits: torch.Tensor, b: SamplingBatch, safe: bool = False) -> torch.Tensor:
    """grammar mask → bias → min_tokens → penalties, on a float32 copy (the caller's tensor is left alone);
    `safe` also makes the result finite-or--inf (guards.sanitize_)."""
    if not b.mutates_logits and not safe:
        return logits.to(torch.float32)
    logits = logits.to(torch.float32, copy=True)
    if b.allowed is not None:   # first, so every later stage and logprobs see the constraint
        rows = b.grammar_index
        logits[rows] = logits[rows].masked_fill_(~b.allowed, float("-inf"))
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
    return sanitize_(logits) if safe else logits


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
    in [0, 1) q is never 0, so p / q has no 0/0. Out of place: the guards read `probs`."""
    return (probs / _uniforms(b, probs.shape, probs, probs.dtype).log_().neg_()).argmax(-1)


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


def _draw(logits: torch.Tensor, b: SamplingBatch, draw: str, safe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """temperature → top-k/top-p → min-p → one token per row from what is left, and the
    [B, V] probabilities it was drawn from (for the guards)."""
    if b.temperature is not None:
        logits = logits / b.temperature
        if safe:   # a tiny temperature can overflow a large logit to inf
            sanitize_(logits)
    if b.top_k is not None or b.top_p is not None:
        logits = _truncate(logits, b)
    probs = logits.softmax(-1)
    if b.min_p is not None:
        probs.masked_fill_(probs < b.min_p * probs.amax(-1, keepdim=True), 0.0)
    if draw == "auto":
        draw = "inverse_cdf" if probs.device.type == "cpu" else "race"
    return (_race(probs, b) if draw == "race" else _inverse_cdf(probs, b)), probs


def _pick(logits: torch.Tensor, b: SamplingBatch, draw: str, safe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the processed logits, and [B] bool: whether each pick passed
    its guard (guards.greedy_ok / drawn_ok)."""
    if b.all_greedy:
        tokens = logits.argmax(-1)
        return tokens, greedy_ok(logits, tokens)
    tokens, probs = _draw(logits, b, draw, safe)
    ok = drawn_ok(probs, tokens)
    if b.any_greedy:
        argmax = logits.argmax(-1)
        tokens = torch.where(b.greedy, argmax, tokens)
        ok = torch.where(b.greedy, greedy_ok(logits, argmax), ok)
    return tokens, ok


def _to_host(tokens: torch.Tensor, ok: torch.Tensor, logprobs: torch.Tensor | None,
             b: SamplingBatch) -> tuple[SamplerOutput, list[int]]:
    """One device-to-host copy: token ids, the guard flags, then for the asking rows the
    sampled token's logprob, the top-k ids and the top-k logprobs, flattened (float64 holds
    ids exactly). Also returns the rows whose pick failed its guard."""
    B, R, f64 = b.num_rows, len(b.logprob_rows), torch.float64
    k = max((b.logprobs[r] for r in b.logprob_rows), default=0)
    parts = [tokens.to(f64), ok.to(f64)]
    if logprobs is not None:
        asked = tokens[b.logprob_index].clamp(0, b.vocab_size - 1)   # a failed pick may be out of range
        parts.append(logprobs.gather(1, asked.unsqueeze(1)).to(f64).flatten())
        if k:
            top = logprobs.topk(k, dim=-1)
            parts += [top.indices.to(f64).flatten(), top.values.to(f64).flatten()]
    flat = torch.cat(parts).tolist()
    ids = [int(x) for x in flat[:B]]
    bad = [row for row in range(b.num_rows) if not (flat[B + row] and 0 <= ids[row] < b.vocab_size)]
    flat = flat[:B] + flat[2 * B:]
    out: list[TokenLogprob | None] = [None] * B
    top_ids, top_vals = flat[B + R: B + R + R * k], flat[B + R + R * k:]
    for i, row in enumerate(b.logprob_rows):
        alts = [(int(top_ids[i * k + j]), top_vals[i * k + j]) for j in range(b.logprobs[row])]
        out[row] = TokenLogprob(token_id=ids[row], logprob=flat[B + i], top=alts)
    return SamplerOutput(token_ids=ids, logprobs=out), bad


class Sampler:
    """Holds only how to draw; everything per step arrives in the SamplingBatch.
    draw: "race" | "inverse_cdf" | "auto" (inverse_cdf on CPU, race elsewhere)."""

    def __init__(self, draw: str = "auto"):
        if draw not in ("auto", "race", "inverse_cdf"):
            raise ValueError(f"unknown draw {draw!r}")
        self.draw = draw

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.shape == (batch.num_rows, batch.vocab_size), (tuple(logits.shape), batch.num_rows)
        try:
            out, bad = self._sample(logits, batch, safe=False)
        except Exception:   # a bug that some row's parameters trigger: find that row alone
            log.exception("the batched sampler raised; sampling each of its %d rows alone", batch.num_rows)
            out = SamplerOutput([0] * batch.num_rows, [None] * batch.num_rows)
            bad = list(range(batch.num_rows))
        if bad:
            self._repair(logits, batch, out, bad)
        out.failed.update(batch.failed)
        return out

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch, safe: bool) -> tuple[SamplerOutput, list[int]]:
        raw = logits
        logits = _process(logits, batch, safe)
        logprobs = None
        if batch.logprob_index is not None:
            logprobs = torch.log_softmax(logits[batch.logprob_index], dim=-1)
        tokens, ok = _pick(logits, batch, self.draw, safe)
        if safe:   # the last resort, always a valid id
            tokens = torch.where(ok, tokens, fallback_tokens(logits, raw))
            ok = torch.ones_like(ok)
        return _to_host(tokens, ok, logprobs, batch)

    def _repair(self, logits: torch.Tensor, batch: SamplingBatch, out: SamplerOutput, rows: list[int]) -> None:
        """Sample `rows` again in safe mode, together; if that raises, each alone, and a row
        that still raises is failed (with the raw argmax as a placeholder, so the id is valid)."""
        log.warning("sampling: %d row(s) of %d failed their guard or raised; sampled again in safe mode",
                    len(rows), batch.num_rows)
        groups = [rows]
        while groups:
            group = groups.pop()
            index = torch.tensor(group, device=logits.device)
            try:
                fixed, _ = self._sample(logits[index], batch.select(group), safe=True)
            except Exception:
                if len(group) > 1:
                    groups += [[row] for row in group]
                    continue
                log.exception("sampling row %d raised by itself; that request alone is failed", group[0])
                fixed = SamplerOutput(fallback_tokens(logits[index].float(), logits[index]).tolist(), [None])
                out.failed[group[0]] = SAMPLING_FAILED
            for i, row in enumerate(group):
                out.token_ids[row], out.logprobs[row] = fixed.token_ids[i], fixed.logprobs[i]
