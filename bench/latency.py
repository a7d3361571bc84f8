"""Single-stream latency through HTTP on the very prompts `bench/offline.py --single-stream`
streams offline (random token ids, same seed), with a light synchronous client: on a 2-core
machine an asyncio benchmark client competes with the engine for the cores and its own
per-chunk work shows up as server latency.

    gateway serve --port 8000 &
    python bench/latency.py --base-url http://127.0.0.1:8000 --num-prompts 8 --input-len 128 --output-len 128
    python bench/offline.py --single-stream --num-prompts 8 --input-len 128 --output-len 128

Order: one untimed warm-up request (the first prompt, as offline.py warms up) → each prompt
streamed alone from /v1/completions (ignore_eos, greedy) → TTFT (send → first text chunk)
and the gaps between text chunks, printed like offline.py's single-stream figures.
"""

from __future__ import annotations

import argparse
import time

import httpx
import orjson

from offline import format_latencies, random_prompts


def stream_one(client: httpx.Client, url: str, prompt: list[int], output_len: int) -> tuple[float, list[float]]:
    body = {"prompt": prompt, "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True}
    sent = last = time.perf_counter()
    ttft, gaps = None, []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = orjson.loads(line[len("data: "):]).get("choices") or [{}]
            if not choices[0].get("text"):
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - sent
            else:
                gaps.append(now - last)
            last = now
    return ttft, gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=49152, help="as offline.py draws its prompts")
    args = p.parse_args()
    prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size)
    ttfts, itls = [], []
    with httpx.Client(timeout=600) as client:
        stream_one(client, args.base_url, prompts[0], 4)   # warm-up
        for prompt in prompts:
            ttft, gaps = stream_one(client, args.base_url, prompt, args.output_len)
            ttfts.append(ttft)
            itls += gaps
    print(f"HTTP single stream: {len(prompts)} prompts\n  TTFT {format_latencies(ttfts)}\n  ITL  {format_latencies(itls)}")


if __name__ == "__main__":
    main()
