"""IncrementalDetokenizer: one request's output tokens → text deltas never to be retracted.

Owns, per request: a sliding window of recent token ids (vLLM's prefix_offset/read_offset
scheme: the window is the tokens of the last released chunk, kept as decoding context,
followed by the tokens not yet turned into text), the text decoded but not yet released,
and the stop string that ended the request, if any. Each step, in order:
  1. append the new ids and decode the window only, never the whole output; text ending
     in U+FFFD is an incomplete UTF-8 character, so the new ids wait for the next step;
  2. look for the earliest stop string in the unreleased text; on a match release the
     text before it and finish (the stop string and everything after it are dropped);
  3. otherwise release all but the longest tail that is still a prefix of a stop string.
flush() releases whatever is held back once the request has ended some other way.

The engine should not feed the token that ends a request by EOS / stop_token_ids here
when skip_special_tokens is off, or its text (e.g. "<|im_end|>") reaches the client.

Why not tokenizers.decoders.DecodeStream (tokenizers 0.23 has it): it runs the same
window algorithm in Rust (~1.5 µs/token against ~2.5 µs here), but seeding it with prompt
ids makes its first step return the prompt's text, an incomplete character it holds back
cannot be flushed, and slow tokenizers would still need this path.
"""

from __future__ import annotations

from typing import Callable

import tokenizers

from gateway.sampling.params import SamplingParams

# Prompt tokens kept as decoding context, so the first output token decodes as it would
# mid-text (SentencePiece drops a leading space at the very start of a decode).
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids → text. A fast tokenizer goes straight to its Rust `tokenizers.Tokenizer`;
    anything else (HF slow tokenizers) through `.decode`, with no whitespace clean-up,
    whose result at a window's edge could differ from the whole text's."""
    backend = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._decode = _decoder(tokenizer, params.skip_special_tokens)
        self._stops = list(dict.fromkeys(params.stop))       # deduplicated, order kept
        self._stop_starts = {s[0] for s in self._stops}
        self._longest_stop = max(map(len, self._stops), default=0)
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._ids)                            # window[:_read] is context
        self._context_text = self._decode(self._ids)
        self._pending = ""                                     # decoded, not yet released
        self.stop_string: str | None = None                    # set once a stop string matched

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Feed the step's new tokens; returns (text to release now, the stop string that
        matched or None). After a stop string, further tokens are ignored."""
        if self.stop_string is not None:
            return "", None
        self._ids.extend(new_token_ids)
        self._pending += self._read_window()
        return self._release()

    def flush(self) -> str:
        """Release everything still held back: a tail that might have become a stop
        string and an incomplete character (as U+FFFD, as a full decode would show it).
        Returns "" once a stop string ended the request."""
        if self.stop_string is not None:
            return ""
        text = self._decode(self._ids)
        rest = text[len(self._context_text):] if len(text) > len(self._context_text) else ""
        released, self._pending = self._pending + rest, ""
        self._ids, self._read, self._context_text = [], 0, ""   # a second flush releases ""
        return released

    def _read_window(self) -> str:
        """Text the unread tokens add to the context, or "" while it is not yet whole."""
        text = self._decode(self._ids)
        if len(text) <= len(self._context_text) or text.endswith(_INCOMPLETE):
            return ""
        new_text = text[len(self._context_text):]
        # Slide: the tokens just read become the context for the next ones.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new_text

    def _release(self) -> tuple[str, str | None]:
        text = self._pending
        if not self._stops:
            self._pending = ""
            return text, None
        hit = self._earliest_stop(text)
        if hit is not None:
            index, self.stop_string = hit
            self._pending = ""
            return text[:index], self.stop_string
        cut = len(text) - self._partial_stop_length(text)
        self._pending = text[cut:]
        return text[:cut], None

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        found = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        return min(found, key=lambda hit: (hit[0], len(hit[1]))) if found else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string: that much
        must wait, since the next tokens could complete the stop string."""
        for i in range(max(0, len(text) - self._longest_stop + 1), len(text)):
            # The set lookup skips most positions before any string comparison.
            if text[i] in self._stop_starts and any(s.startswith(text[i:]) for s in self._stops):
                return len(text) - i
        return 0
