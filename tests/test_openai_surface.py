"""The rest of the OpenAI surface, through the official `openai` client against one real
in-process server on a tiny random-weight model: usage.prompt_tokens_details.cached_tokens
(chat and completions, streamed and not), /v1/embeddings and /v1/responses."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from live_server import LiveServer

MODEL = "m"


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with LiveServer(model=str(tiny_llama_dir), served_model_name=MODEL, num_kv_blocks=256, block_size=16,
                    max_model_len=512) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def long_prompt(live, seed: int, tokens: int = 300) -> list[int]:
    """`tokens` token ids, distinct per seed (no accidental prefix sharing between tests)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1000, 40000, tokens)]


# ---- cached_tokens --------------------------------------------------------------------------

def test_cached_tokens_on_a_repeated_long_completion_prompt(live, client):
    prompt = long_prompt(live, 1)
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == 300
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # every full block but the one holding the last token: 18 of 16 tokens
    assert second.usage.prompt_tokens_details.cached_tokens == 288


def test_cached_tokens_streamed_chat_usage_chunk(live, client):
    text = " ".join(f"word{i}" for i in range(80))   # a few hundred tokens of chat prompt
    messages = [{"role": "user", "content": text}]

    def streamed_usage():
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                      stream_options={"include_usage": True}))
        assert chunks[-1].choices == []
        return chunks[-1].usage
    fresh, again = streamed_usage(), streamed_usage()
    assert fresh.prompt_tokens > 256
    assert fresh.prompt_tokens_details.cached_tokens == 0
    assert again.prompt_tokens_details.cached_tokens == (fresh.prompt_tokens - 1) // 16 * 16 > 0
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.usage.prompt_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens
