"""bench/serve.py: run as a subprocess against a live server; its JSON, counts and plot.

The benchmark itself is tested against a fake OpenAI-compatible server (this file, run as
`python tests/test_bench_serve.py PORT`) that streams exactly max_tokens one-token chunks
and a usage chunk, so every figure the benchmark reports is known in advance. A slow test
repeats the run against the real `gateway serve`.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "serve.py"
sys.path.insert(0, str(ROOT / "bench"))   # also when run as the fake server (no conftest then)

# Keys `vllm bench serve --save-result` writes (vllm/benchmarks/serve.py), percentiles 50,90,99.
VLLM_KEYS = {
    "date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
    "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
    "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests",
} | {f"{stat}_{m}_ms" for stat in ("mean", "median", "std", "p50", "p90", "p99")
     for m in ("ttft", "tpot", "itl", "e2el")}
FAKE_TOKEN_DELAY = 0.01


# ---------------------------------------------------------------- the fake server

def fake_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[dict] = []

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def requests_seen(_):
        return JSONResponse(seen)

    async def generate(request):
        body = await request.json()
        seen.append(body)
        chat = "messages" in body
        text = json.dumps(body.get("messages")) if chat else body["prompt"]
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "asked to fail"}}, status_code=500)
        prompt_tokens = len(body["messages"][-1]["content"].split()) if chat else len(
            text.split())
        return StreamingResponse(stream(chat, body["max_tokens"], prompt_tokens),
                                 media_type="text/event-stream")

    async def stream(chat, max_tokens, prompt_tokens):
        def chunk(piece, finish=None):
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": finish}
                      if chat else {"index": 0, "text": piece, "finish_reason": finish})
            return f"data: {json.dumps({'choices': [choice]})}\n\n"

        if chat:   # the role-only first chunk real servers send carries no token
            yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {
                "role": "assistant", "content": ""}}]}) + "\n\n")
        for i in range(max_tokens):
            await asyncio.sleep(FAKE_TOKEN_DELAY)
            yield chunk(f"t{i} ", "length" if i == max_tokens - 1 else None)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return Starlette(routes=[
        Route("/v1/models", models), Route("/seen", requests_seen),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ])


# ---------------------------------------------------------------- process helpers

from procs import free_port, gateway_serve_available, stop, wait_http  # noqa: E402  (shared helpers)
from server_process import ServerProcess  # noqa: E402


def run_bench(base_url: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH), "--base-url", base_url, "--disable-tqdm", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def fake_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)], cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


# ---------------------------------------------------------------- tests against the fake

def test_bench_reports_vllm_keys_and_exact_counts(fake_server, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    done = run_bench(fake_server, "--dataset", "random", "--num-prompts", "6",
                     "--random-input-len", "12", "--random-output-len", "5",
                     "--max-concurrency", "3", "--metric-percentiles", "50,90,99",
                     "--save-result", "--result-filename", str(out), "--plot", str(png))
    result = json.loads(out.read_text())
    assert VLLM_KEYS <= set(result), VLLM_KEYS - set(result)
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["model_id"] == "fake-model"          # picked from GET /v1/models
    assert result["total_output_tokens"] == 6 * 5      # from the usage chunks
    assert result["total_input_tokens"] == 6 * 12      # random words, one per token here
    # vLLM's definition: requests active at any time within the busiest 1 s bucket
    assert 3 <= result["max_concurrent_requests"] <= 6
    # The fake sleeps FAKE_TOKEN_DELAY before every token: ITL and TPOT are at least that.
    assert result["median_itl_ms"] >= FAKE_TOKEN_DELAY * 1000 * 0.9
    assert result["mean_tpot_ms"] >= FAKE_TOKEN_DELAY * 1000 * 0.9
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"] > 0
    assert result["output_throughput"] == pytest.approx(30 / result["duration"])
    assert "input_lens" not in result                  # only with --save-detailed
    assert " Serving Benchmark Result " in done.stdout and "P90 ITL (ms):" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sends_streaming_usage_and_exact_length_options(fake_server, tmp_path):
    out = tmp_path / "r.json"
    run_bench(fake_server, "--dataset", "prefix-repetition", "--num-prompts", "4",
              "--prefix-len", "8", "--suffix-len", "4", "--num-prefixes", "2",
              "--random-output-len", "3", "--endpoint-type", "completions",
              "--ready-check-timeout-sec", "0", "--save-result", "--result-filename", str(out))
    body = httpx.get(fake_server + "/seen").json()[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (3, 3, True)
    assert body["temperature"] == 0.0 and "prompt" in body
    assert json.loads(out.read_text())["total_output_tokens"] == 12


def test_bench_counts_failed_requests_and_jsonl_max_tokens(fake_server, tmp_path):
    data, out = tmp_path / "d.jsonl", tmp_path / "r.json"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4},
        {"messages": [{"role": "user", "content": "please FAIL"}]},
        {"prompt": "one two three", "max_tokens": 2},
    ]) + "\n")
    run_bench(fake_server, "--dataset", "jsonl", "--dataset-path", str(data),
              "--ready-check-timeout-sec", "0", "--save-result", "--save-detailed",
              "--result-filename", str(out))
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (2, 1)
    assert result["output_lens"] == [4, 0, 2]
    assert result["errors"][1].startswith("HTTP 500")
    assert result["total_input_tokens"] == 2 + 3


# ---------------------------------------------------------------- units of the helpers

def test_arrival_offsets_keep_the_average_rate():
    import numpy as np
    from serve import arrival_offsets

    rng = np.random.default_rng(0)
    poisson = arrival_offsets(100, 10.0, 1.0, rng)
    assert poisson[-1] == pytest.approx(10.0) and poisson == sorted(poisson)
    assert arrival_offsets(4, 2.0, float("inf"), rng) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert arrival_offsets(3, float("inf"), 1.0, rng) == [0.0, 0.0, 0.0]


def test_peak_output_throughput_is_the_busiest_second():
    from serve_client import RequestOutput
    from serve_report import calculate_metrics

    a = RequestOutput(success=True, start_time=0.0, latency=2.5, ttft=0.1, output_tokens=4,
                      chunk_times=[0.1, 0.2, 0.3, 2.4], itl=[0.1, 0.1, 2.1])
    b = RequestOutput(success=True, start_time=1.0, latency=1.0, ttft=0.5, output_tokens=2,
                      chunk_times=[0.5, 0.6], itl=[0.1])
    failed = RequestOutput(success=False, error="boom")
    result = calculate_metrics([a, b, failed], 2.5, ["tpot", "itl"], [50.0])
    assert result["max_output_tokens_per_s"] == 3        # a's first three tokens in second 0
    assert result["max_concurrent_requests"] == 2
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (2, 1, 6)
    assert result["mean_tpot_ms"] == pytest.approx(((2.4 / 3) + 0.5) / 2 * 1000)
    assert result["p50_itl_ms"] == pytest.approx(100.0)
    assert "mean_ttft_ms" not in result                   # not among the selected metrics


def test_prefix_repetition_prompts_share_their_prefixes():
    from serve_datasets import TextMaker, prefix_repetition_samples

    rng = random.Random(0)
    samples = prefix_repetition_samples(rng, TextMaker(rng), num_prompts=9, prefix_len=20,
                                        suffix_len=5, num_prefixes=3, output_len=7)
    prefixes = {" ".join(s.prompt.split()[:20]) for s in samples}
    assert len(prefixes) == 3 and len({s.prompt for s in samples}) == 9
    assert all(len(s.prompt.split()) == 25 and s.expected_output_len == 7 for s in samples)


# ---------------------------------------------------------------- against the real server

@pytest.mark.slow
@pytest.mark.skipif(not gateway_serve_available(), reason="this gateway has no `serve` command")
def test_bench_against_the_real_gateway(tmp_path):
    with ServerProcess([], start_timeout_s=300, stop_timeout_s=30) as server:
        out, png = tmp_path / "r.json", tmp_path / "p.png"
        run_bench(server.url, "--num-prompts", "4", "--random-input-len",
                  "32", "--random-output-len", "8", "--max-concurrency", "2",
                  "--save-result", "--result-filename", str(out), "--plot", str(png),
                  timeout=300)
        result = json.loads(out.read_text())
        assert (result["completed"], result["failed"]) == (4, 0)
        assert result["total_output_tokens"] == 4 * 8      # ignore_eos + min_tokens honoured
        assert result["total_input_tokens"] >= 4 * 32
        assert png.stat().st_size > 0


if __name__ == "__main__":   # the fake server, for the fixture above
    import uvicorn

    uvicorn.run(fake_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
