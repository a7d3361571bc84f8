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


# ---- embeddings -----------------------------------------------------------------------------

SENTENCES = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'} and more" * (1 + i % 3)
             for i in range(64)]


def test_embeddings_float_and_base64_decode_to_the_same_unit_vectors(live, client):
    floats = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float")
    b64 = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1, 2]
    default = client.embeddings.create(model=MODEL, input=SENTENCES[:3])   # the SDK asks base64, decodes it
    for f, b, d in zip(floats.data, b64.data, default.data):
        assert len(f.embedding) == 64   # the tiny model's hidden size
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")   # asked explicitly: left as text
        np.testing.assert_allclose(f.embedding, decoded, rtol=0, atol=1e-7)
        np.testing.assert_allclose(f.embedding, d.embedding, rtol=0, atol=1e-7)
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5
    raw = httpx.post(live.url + "/v1/embeddings", json={"input": "x", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (64,)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    assert live.blocks_in_use() == 0


def test_identical_inputs_identical_vectors_and_a_batch_equals_single_calls(live, client):
    batch = client.embeddings.create(model=MODEL, input=SENTENCES).data
    assert len(batch) == 64
    singles = [client.embeddings.create(model=MODEL, input=s).data[0].embedding for s in SENTENCES]
    np.testing.assert_allclose([d.embedding for d in batch], singles, rtol=0, atol=2e-2)
    again = client.embeddings.create(model=MODEL, input=SENTENCES[5]).data[0].embedding
    assert again == singles[5]
    assert not np.allclose(singles[0], singles[1])   # different inputs, different vectors


def test_token_id_inputs_and_dimensions(live, client):
    ids = live.engine.tokenizer.encode(SENTENCES[0])
    by_text = client.embeddings.create(model=MODEL, input=SENTENCES[0]).data[0].embedding
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids]).data
    np.testing.assert_allclose(by_ids[0].embedding, by_text, atol=1e-6)
    short = client.embeddings.create(model=MODEL, input=ids, dimensions=16).data[0].embedding
    expected = np.asarray(by_text[:16]) / np.linalg.norm(by_text[:16])
    np.testing.assert_allclose(short, expected, atol=1e-6)


@pytest.mark.parametrize("body, status, param", [
    ({"input": "x", "dimensions": 65}, 400, "dimensions"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [1, 99999999]}, 400, "input"),
    ({"input": ["a"] * 2049}, 400, "input"),
    ({"input": [[5] * 600]}, 400, "input"),
    ({"input": [[5] * 500] * 700}, 413, "input"),
    ({"input": "x", "pooling": "cls"}, 400, "pooling"),
    ({}, 400, "input"),
])
def test_bad_embedding_requests_name_the_field(live, body, status, param):
    response = httpx.post(live.url + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


# ---- responses ------------------------------------------------------------------------------

def test_responses_create_non_streamed(live, client):
    response = client.responses.create(model=MODEL, input="Name three colors.", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 8 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.output_text == response.output[0].content[0].text
    same = client.responses.create(model=MODEL, input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name three colors."}]}],
        max_output_tokens=8, temperature=0)
    assert same.output_text == response.output_text   # instructions are the system message
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}])
    assert chat.choices[0].message.content == response.output_text


def test_responses_create_streamed_events_as_the_sdk_parses_them(live, client):
    events = list(client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=12,
                                          temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == deltas == events[-4].text
    assert final.usage.output_tokens == 12 and final.usage.input_tokens > 0
    plain = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=12, temperature=0)
    assert plain.output_text == deltas
    assert live.blocks_in_use() == 0


def test_responses_json_schema_format(live, client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    response = client.responses.create(model=MODEL, input="json", max_output_tokens=40, temperature=1.0,
                                       text={"format": {"type": "json_schema", "name": "x", "schema": schema,
                                                        "strict": True}})
    if response.status == "completed":
        assert isinstance(__import__("json").loads(response.output_text)["a"], int)
    else:   # a random model may run out of tokens inside the object, but never leaves the grammar
        assert response.output_text.startswith("{")


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "x", "bogus": 1}, "bogus"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "o"}]}, "input[0].role"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
])
def test_bad_responses_requests_name_the_field(live, body, param):
    response = httpx.post(live.url + "/v1/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
