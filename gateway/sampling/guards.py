"""Numerical guards for the sampler: what makes one row's pick trustworthy, how a bad row's
logits are made finite, and the deterministic token a row gets when nothing else is left.

Everything here is per row, so applying it to a batch changes no healthy row. The checks are
O(B) (a gather per row); the repairs touch only the rows the checks rejected.
"""

from __future__ import annotations

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def sanitize_(logits: torch.Tensor) -> torch.Tensor:
    """In place: NaN → -inf (no candidate), +inf → the largest float (a certain token that
    still leaves softmax finite), -inf kept (banned). Finite values are untouched."""
    return torch.nan_to_num_(logits, nan=float("-inf"), posinf=FLOAT32_MAX, neginf=float("-inf"))


def _chosen(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values[row, tokens[row]] for each row, with out-of-range ids read at a safe index."""
    safe = tokens.clamp(0, values.shape[-1] - 1).unsqueeze(1)
    return values.gather(1, safe).squeeze(1)


def in_range(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return (tokens >= 0) & (tokens < vocab_size)


def greedy_ok(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B] bool: the argmax is a finite logit. argmax picks a NaN over any number and +inf
    over any finite value, and an all -inf row has no candidate, so each of those fails."""
    return _chosen(logits, tokens).isfinite() & in_range(tokens, logits.shape[-1])


def drawn_ok(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B] bool: the drawn token has probability > 0 and a valid id. A row whose tempered,
    truncated logits held a NaN or +inf, or no finite value, has an all-NaN softmax (its
    normalizer is NaN), so its pick fails here whatever the draw returned."""
    return (_chosen(probs, tokens) > 0) & in_range(tokens, probs.shape[-1])


def fallback_tokens(processed: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """[B] long, always in [0, V): the argmax of the processed (sanitized) logits where a row
    has a finite candidate, else the argmax of the raw model logits with NaN as -inf (token 0
    if even those hold nothing)."""
    best = processed.argmax(-1)
    has_candidate = _chosen(processed, best) > float("-inf")
    raw_best = sanitize_(raw.to(torch.float32, copy=True)).argmax(-1)
    return torch.where(has_candidate, best, raw_best)
