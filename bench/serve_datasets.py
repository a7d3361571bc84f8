"""Prompt sources for bench/serve.py: random, prefix-repetition and jsonl conversations.

Each builder returns a list of SampleRequest; nothing is sent from here. Randomness comes
from the `random.Random` passed in, so a seed reproduces the same prompts. With a tokenizer
(--tokenizer: an HF directory or a .gguf file) prompts are random token ids decoded to text
and trimmed so they re-encode to the requested length; without one they are random words,
whose token count is only approximate (the server's usage chunk reports the real count).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A small fixed vocabulary: common words that most BPE tokenizers encode as one token.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which "
    "are be had not have or one all were but when there can an their more has been "
    "time other some would about into than its could these two may first then do any "
    "like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might "
    "great old year off come since against go came right used take three house water"
).split()


@dataclass
class SampleRequest:
    prompt: str | list[dict[str, Any]]   # text, or chat messages (jsonl "messages")
    prompt_len: int                      # estimated; replaced by usage.prompt_tokens
    expected_output_len: int             # sent as max_tokens


def load_tokenizer(path: str | None):
    """An HF tokenizer from a directory / hub-free name, or from a .gguf file; None if no path."""
    if not path:
        return None
    from transformers import AutoTokenizer  # heavy import: only when asked for

    target = Path(path)
    if target.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name)
    return AutoTokenizer.from_pretrained(path)


def sample_lengths(rng: random.Random, mean: int, ratio: float, count: int) -> list[int]:
    """Uniform integers in [mean*(1-ratio), mean*(1+ratio)], at least 1 (vLLM's range ratio)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), not {ratio}")
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


class TextMaker:
    """Random text of a given token length: from a tokenizer when given, else from WORDS."""

    def __init__(self, rng: random.Random, tokenizer=None):
        self.rng = rng
        self.tokenizer = tokenizer
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            self.ids = [i for i in range(len(tokenizer)) if i not in special]

    def make(self, num_tokens: int) -> str:
        if self.tokenizer is None:
            return " ".join(self.rng.choice(WORDS) for _ in range(num_tokens))
        ids = [self.rng.choice(self.ids) for _ in range(num_tokens)]
        text = self.tokenizer.decode(ids)
        # Decoding then re-encoding can merge or split tokens: trim to the exact length.
        again = self.tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
        return self.tokenizer.decode(again)


def random_samples(rng: random.Random, maker: TextMaker, num_prompts: int, input_len: int,
                   output_len: int, range_ratio: float) -> list[SampleRequest]:
    ins = sample_lengths(rng, input_len, range_ratio, num_prompts)
    outs = sample_lengths(rng, output_len, range_ratio, num_prompts)
    return [SampleRequest(maker.make(n_in), n_in, n_out) for n_in, n_out in zip(ins, outs)]


def prefix_repetition_samples(rng: random.Random, maker: TextMaker, num_prompts: int,
                              prefix_len: int, suffix_len: int, num_prefixes: int,
                              output_len: int) -> list[SampleRequest]:
    """num_prefixes long shared prefixes, each followed by many distinct suffixes, shuffled
    so that requests sharing a prefix interleave (what a prefix cache must handle)."""
    if num_prefixes < 1:
        raise ValueError("--num-prefixes must be >= 1")
    prefixes = [maker.make(prefix_len) for _ in range(num_prefixes)]
    samples = [SampleRequest(prefixes[i % num_prefixes] + " " + maker.make(suffix_len),
                             prefix_len + suffix_len, output_len) for i in range(num_prompts)]
    rng.shuffle(samples)
    return samples


def _estimate_len(prompt: str | list[dict], tokenizer) -> int:
    text = prompt if isinstance(prompt, str) else " ".join(
        str(m.get("content", "")) for m in prompt)
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return len(text.split())


def jsonl_samples(path: str, num_prompts: int, default_output_len: int,
                  tokenizer=None) -> list[SampleRequest]:
    """Lines of {"messages": [...]} or {"prompt": "...", "max_tokens": N}; the first
    num_prompts lines are used (all of them when the file is shorter)."""
    samples: list[SampleRequest] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if len(samples) >= num_prompts:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = row.get("messages", row.get("prompt"))
            if not isinstance(prompt, (str, list)) or not prompt:
                raise ValueError(f"{path}:{lineno}: needs a 'messages' list or a 'prompt' string")
            out_len = int(row.get("max_tokens") or default_output_len)
            samples.append(SampleRequest(prompt, _estimate_len(prompt, tokenizer), out_len))
    if not samples:
        raise ValueError(f"{path} holds no requests")
    return samples


def get_samples(args, rng: random.Random) -> list[SampleRequest]:
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return jsonl_samples(args.dataset_path, args.num_prompts, args.random_output_len,
                             tokenizer)
    maker = TextMaker(rng, tokenizer)
    if args.dataset == "random":
        return random_samples(rng, maker, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio)
    return prefix_repetition_samples(rng, maker, args.num_prompts, args.prefix_len,
                                     args.suffix_len, args.num_prefixes,
                                     args.random_output_len)
