"""Shared fixtures: the default model's converted directory, tiny random-weight models of
each supported architecture (with the default model's tokenizer), and free ports.

Hypothesis profiles, chosen here once for the whole run: `ci` (selected by CI=true) is
derandomized with no example database, so one commit always gets one verdict; `dev` (the
default) draws fresh examples each run; `explore` searches long and at random:
    HYPOTHESIS_PROFILE=explore python -m pytest -q tests/test_scheduler_properties.py
Whatever a search finds becomes a pinned example (see test_scheduler_properties.replay)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# bench/ on the path: tests start `gateway serve` with the bench's ServerProcess (one helper).
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))   # last: shadows nothing

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=10_000, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG states, whatever ran before it: tests that
    draw from torch's or random's global generator get the same data on every run."""
    import random
    import sys
    random.seed(0)
    if "torch" in sys.modules:   # seeding never imports torch for tests that do not use it
        sys.modules["torch"].manual_seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from gateway.models.loader import resolve_source
    return resolve_source(None, Path("~/.cache/gateway").expanduser()).directory


def make_tiny_model(target: Path, tokenizer_dir: Path, architecture: str = "llama", shard: bool = False,
                    **overrides) -> Path:
    """A random-weight model directory with real tokenizer files; small enough for CPU tests."""
    import torch
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    model = model_cls(config_cls(**common)).eval()
    model.save_pretrained(target, max_shard_size="500KB" if shard else "2GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


@pytest.fixture
def tiny_model(tmp_path, default_model_dir):
    def build(architecture: str = "llama", shard: bool = False, **overrides) -> Path:
        return make_tiny_model(tmp_path / f"{architecture}-model", default_model_dir, architecture, shard, **overrides)
    return build


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """One tiny random-weight llama for the whole session (building one takes ~10 s)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-session") / "llama", default_model_dir)
