"""TokenLogprob: one sampled token's logprob and its best alternatives. The sampler produces
it; RequestOutput (engine/messages.py) carries it up to the API unchanged, so it lives here,
in the lowest layer that makes one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token_id, logprob) of the top alternatives, best first
