"""OpenAI response objects: envelopes, choices, stream deltas, usage and both logprobs shapes
(chat's `content` list, the legacy completions object), exactly as the OpenAI API writes
them. Pure functions; the shapers (shapers.py) call them."""

from __future__ import annotations

import math
from typing import Callable

from gateway.sampling.logprobs import TokenLogprob

TokenStr = Callable[[int], str]


def _lp(value: float) -> float:
    # JSON has no -inf/NaN; vLLM clamps to the same floor.
    return value if math.isfinite(value) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """cached_tokens: prompt tokens the prefix cache supplied (OpenAI's cost-accounting field)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries: list[TokenLogprob], token_str: TokenStr) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        token = token_str(token_id)
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], token_str: TokenStr, offset: int) -> tuple[dict, int]:
    """The legacy logprobs object, and the text offset after its last token."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        token = token_str(e.token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(_lp(e.logprob))
        out["top_logprobs"].append({token_str(t): _lp(lp) for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict],
             usage_obj: dict | None = None, with_usage: bool = True) -> dict:
    """kind: chat.completion | chat.completion.chunk | text_completion."""
    obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        obj["usage"] = usage_obj
    return obj


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
