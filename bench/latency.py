"""Single-stream latency through HTTP on the very prompts `bench/offline.py --single-stream`
streams offline (random token ids, same seed), with a light synchronous client: on a 2-core
machine an asyncio benchmark client competes with the engine for the cores and its own
per-chunk work shows up as server latency.

    gateway serve --port 8000 &
    python bench/latency.py --base-url http://127.0.0.1:8000 --num-prompts 8 --input-len 128 --output-len 128
    python bench/offline.py --single-stream --num-prompts 8 --input-len 128 --output-len 128

On a noisy machine one pair of runs says little; `--pairs N` alternates the two N times
(offline.py as a subprocess and a fresh `gateway serve` on a free loopback port, stopped
by PID: a fresh server each time, since a second pass would hit the prefix cache; which of
the two goes first alternates, so that a drift in machine speed cancels out) and
prints each pair's HTTP/offline ratios and their medians:

    python bench/latency.py --pairs 5

`--concurrency C [C ...]` measures C streams at once instead (ignore_eos, greedy): offline is
offline.py's batched run of the same C prompts (output tok/s), HTTP is C concurrent streams
from a thread pool against a fresh server; each pair prints output tok/s of both, the HTTP
path's per-token overhead (1/HTTP - 1/offline, in ms per token) and the server's event-loop
CPU per 1,000 streamed tokens (utime + stime of the server's main thread, where uvicorn's
event loop runs, from /proc/PID/task/PID/stat, read after the warm-up and after the run):

    python bench/latency.py --pairs 2 --concurrency 32 64 --input-len 64 --output-len 64

Order: one untimed warm-up request (the first prompt, as offline.py warms up) → each prompt
streamed alone from /v1/completions (ignore_eos, greedy) → TTFT (send → first text chunk)
and the gaps between text chunks, printed like offline.py's single-stream figures.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from offline import format_latencies, random_prompts
from server_process import ServerProcess


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


def measure_http(base_url: str, prompts: list[list[int]], output_len: int) -> tuple[list[float], list[float]]:
    ttfts, itls = [], []
    with httpx.Client(timeout=600) as client:
        stream_one(client, base_url, prompts[0], 4)   # warm-up
        for prompt in prompts:
            ttft, gaps = stream_one(client, base_url, prompt, output_len)
            ttfts.append(ttft)
            itls += gaps
    return ttfts, itls


def _means_of(report: str) -> dict[str, float]:
    """{'TTFT': mean ms, 'ITL': mean ms} from a format_latencies report."""
    return {name: float(value) for name, value in re.findall(r"(TTFT|ITL)\s+mean ([\d.]+)", report)}


def run_offline(args) -> dict[str, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "offline.py"), "--single-stream", "--num-prompts", str(args.num_prompts),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    return _means_of(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def run_http(args, prompts) -> dict[str, float]:
    """A fresh `gateway serve` (ServerProcess: free loopback port, stopped by PID) measured by measure_http."""
    server = ServerProcess([], start_timeout_s=300)
    try:
        server.wait_ready()
        ttfts, itls = measure_http(server.url, prompts, args.output_len)
        return {"TTFT": 1e3 * statistics.fmean(ttfts), "ITL": 1e3 * statistics.fmean(itls)}
    finally:
        server.stop()


def stream_tokens(client: httpx.Client, url: str, prompt: list[int], output_len: int) -> int:
    """Streams one completion; returns the tokens it received (coalesced chunks count each token)."""
    body = {"prompt": prompt, "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = orjson.loads(line[len("data: "):]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


def main_thread_cpu_s(pid: int) -> float:
    """utime + stime of the process's main thread (tid == pid), in seconds."""
    fields = open(f"/proc/{pid}/task/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_http_concurrent(args, prompts) -> dict[str, float]:
    server = ServerProcess([], start_timeout_s=300)
    try:
        server.wait_ready()
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as client, \
                ThreadPoolExecutor(len(prompts)) as pool:
            stream_tokens(client, server.url, prompts[0], 4)   # warm-up
            cpu0, start = main_thread_cpu_s(server.proc.pid), time.perf_counter()
            tokens = sum(pool.map(lambda p: stream_tokens(client, server.url, p, args.output_len), prompts))
            elapsed, cpu = time.perf_counter() - start, main_thread_cpu_s(server.proc.pid) - cpu0
        return {"tok/s": tokens / elapsed, "loop ms/1k tok": 1e6 * cpu / tokens}
    finally:
        server.stop()


def run_offline_batch(args, n: int) -> float:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "offline.py"), "--num-prompts", str(n),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"= ([\d.]+) output tok/s", out).group(1))


def run_concurrent_pairs(args) -> None:
    for c in args.concurrency:
        prompts = random_prompts(c, args.input_len, args.vocab_size)
        ratios, overheads, loops = [], [], []
        for i in range(max(args.pairs, 1)):
            if i % 2:
                http, offline = run_http_concurrent(args, prompts), run_offline_batch(args, c)
            else:
                offline, http = run_offline_batch(args, c), run_http_concurrent(args, prompts)
            ratios.append(http["tok/s"] / offline)
            overheads.append(1e3 / http["tok/s"] - 1e3 / offline)
            loops.append(http["loop ms/1k tok"])
            print(f"{c} streams, pair {i + 1}: offline {offline:.1f} tok/s, HTTP {http['tok/s']:.1f} tok/s "
                  f"({ratios[-1]:.3f}x, {overheads[-1]:+.3f} ms/token); event loop "
                  f"{loops[-1]:.0f} ms CPU per 1,000 streamed tokens", flush=True)
        print(f"{c} streams, median: HTTP/offline {statistics.median(ratios):.3f}x, "
              f"{statistics.median(overheads):+.3f} ms/token, event loop {statistics.median(loops):.0f} ms/1k tokens",
              flush=True)


def run_pairs(args, prompts) -> None:
    ratios: dict[str, list[float]] = {"TTFT": [], "ITL": []}
    for i in range(args.pairs):
        if i % 2:   # alternate which goes first, so that a drift in machine speed cancels out
            http, offline = run_http(args, prompts), run_offline(args)
        else:
            offline, http = run_offline(args), run_http(args, prompts)
        line = []
        for name in ratios:
            ratios[name].append(http[name] / offline[name])
            line.append(f"{name} offline {offline[name]:.2f} HTTP {http[name]:.2f} ms ({ratios[name][-1] - 1:+.1%})")
        print(f"pair {i + 1}: " + "; ".join(line), flush=True)
    print("median HTTP/offline over pairs: " + ", ".join(
        f"{name} {statistics.median(values) - 1:+.1%}" for name, values in ratios.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=49152, help="as offline.py draws its prompts")
    p.add_argument("--pairs", type=int, default=0, help="alternate offline and fresh-server runs this many times")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="streams at once (one or more values): batched offline vs concurrent HTTP")
    args = p.parse_args()
    if args.concurrency:
        run_concurrent_pairs(args)
        return
    prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size)
    if args.pairs:
        run_pairs(args, prompts)
        return
    ttfts, itls = measure_http(args.base_url, prompts, args.output_len)
    print(f"HTTP single stream: {len(prompts)} prompts\n  TTFT {format_latencies(ttfts)}\n  ITL  {format_latencies(itls)}")


if __name__ == "__main__":
    main()
