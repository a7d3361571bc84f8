"""End to end: a real `gateway serve` subprocess with the default model, driven by the
official `openai` client. One server for the whole module (module-scoped fixture), on a free
loopback port, stopped by its own PID at the end. Greedy (temperature 0) wherever texts are
compared, so the assertions are exact."""

import asyncio
import time

import httpx
import openai
import pytest

from server_process import ServerProcess

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 600
MAX_MODEL_LEN = 1024
MSG = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--max-model-len", str(MAX_MODEL_LEN)], start_timeout_s=START_TIMEOUT_S,
                       stop_timeout_s=30) as proc:
        yield proc.url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_streamed_deltas_equal_the_non_streamed_text(client, model):
    full = client.chat.completions.create(model=model, messages=MSG, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=MSG, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


def test_completion_n_2_and_usage(client, model, server):
    prompt = "The capital of France is"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2, seed=3)
    assert [c.index for c in out.choices] == [0, 1] and all(c.text for c in out.choices)
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    prompt_tokens = httpx.post(server + "/tokenize", json={"prompt": prompt}, timeout=10).json()["count"]
    assert out.usage.prompt_tokens == prompt_tokens   # the prompt counts once, not n times
    assert 2 <= out.usage.completion_tokens <= 16


def test_stop_string_cuts_the_text_before_it(client, model):
    text = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_logprobs_one_entry_per_token(client, model):
    chat = client.chat.completions.create(model=model, messages=MSG, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-3)   # greedy = best
    legacy = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=1)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == legacy.usage.completion_tokens


def test_a_seed_reproduces_a_sampled_text(client, model):
    def sample():
        return client.chat.completions.create(model=model, messages=MSG, max_tokens=16, temperature=1.0,
                                              seed=1234).choices[0].message.content
    assert sample() == sample()


def test_error_paths(client, model, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MSG)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MSG, temperature=-1)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MSG,
                                       tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice={"type": "function", "function": {"name": "g"}})
    assert info.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MSG, max_tokens=MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in info.value.message and f"{MAX_MODEL_LEN} for the completion" in info.value.message
    bad = httpx.post(server + "/v1/chat/completions", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
    # ...and the server still serves afterwards
    after = client.chat.completions.create(model=model, messages=MSG, max_tokens=2)
    assert after.choices[0].message.content


def test_32_concurrent_streams_all_complete(server, model):
    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=12, temperature=0.7, seed=i, stream=True)
        parts, reason = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=600) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(main())
    assert all(text and reason in ("stop", "length") for text, reason in results), results


def _blocks_in_use(server) -> int:
    return httpx.get(server + "/ready", timeout=10).json()["kv_blocks_in_use"]


def test_a_client_disconnecting_mid_stream_frees_its_kv_blocks(server, model):
    body = {"model": model, "messages": MSG, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as response:
        frames = 0
        for line in response.iter_lines():
            frames += line.startswith("data: ")
            if frames == 5:
                assert _blocks_in_use(server) > 0   # it is generating while we are connected
                break   # leaving iter_lines early closes the connection: the disconnect
    deadline = time.monotonic() + 30
    while _blocks_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _blocks_in_use(server) == 0


def test_a_non_streamed_client_timing_out_frees_its_kv_blocks(server, model):
    body = {"model": model, "messages": MSG, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while _blocks_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _blocks_in_use(server) == 0


def test_tokenize_detokenize_and_metrics(server):
    tokens = httpx.post(server + "/tokenize", json={"prompt": "hello world"}, timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(server + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()["prompt"]
    assert "hello world" in text
    metrics = httpx.get(server + "/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}
