"""KV-pressure run (issue 21): the same workload on a pool far too small for it and on one that
fits, to show what preemption costs.

    python bench/kv_pressure.py                          # 64 blocks vs a fitting pool, 40 x 300 / 200
    python bench/kv_pressure.py --num-prompts 10 --output-len 50    # quicker
    python bench/kv_pressure.py --only small             # just the 64-block server

Order of events, per pool: start `gateway serve --num-kv-blocks N` (default model unless
--model) on a free loopback port and wait for /ready → send every request at once (seeded
random token-id prompts, `ignore_eos`, greedy, not streamed) while a probe times GET /ready
every 0.5 s → read gateway:num_preemptions_total and gateway:num_recomputed_tokens_total from
/metrics → print wall time, output tok/s, preemptions, recomputed tokens and the slowest
/ready → stop the server by PID. Then the ratio of the two wall times.

It competes for the CPU with whatever else runs on the machine: compare runs made together."""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from server_process import ServerProcess  # noqa: E402

BLOCK_SIZE = 16
READY_PROBE_INTERVAL_S = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-kv-blocks", type=int, default=64, help="the small pool")
    p.add_argument("--fit-kv-blocks", type=int, default=None,
                   help="the pool that fits (default: every request's whole length, plus 8)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=300)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--only", choices=("small", "fit"), default=None)
    p.add_argument("--model", default=None, help="model for the servers (default: the default model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt token ids are drawn below this")
    p.add_argument("--request-timeout", type=float, default=1800)
    p.add_argument("--server-arg", action="append", default=[], help="extra `gateway serve` argument")
    return p.parse_args(argv)


def fit_blocks(args) -> int:
    per_request = -(-(args.input_len + args.output_len) // BLOCK_SIZE)
    return args.fit_kv_blocks or args.num_prompts * per_request + 8


def prompts(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)   # token ids clear of the special tokens at either end
    return [[rng.randrange(100, vocab_size - 100) for _ in range(args.input_len)]
            for _ in range(args.num_prompts)]


async def probe_ready(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            await client.get("/ready", timeout=30)
            latencies.append(time.perf_counter() - start)
        except httpx.HTTPError:
            latencies.append(float("inf"))
        try:
            await asyncio.wait_for(stop.wait(), READY_PROBE_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def one(client: httpx.AsyncClient, model: str, prompt: list[int], args) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
            "ignore_eos": True}
    response = await client.post("/v1/completions", json=body, timeout=args.request_timeout)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def counter(metrics_text: str, name: str) -> float:
    match = re.search(rf"^gateway:{name}_total\{{[^}}]*\}} (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else float("nan")


async def workload(url: str, args) -> dict:
    limits = httpx.Limits(max_connections=args.num_prompts + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        stop, latencies = asyncio.Event(), []
        probe = asyncio.create_task(probe_ready(client, stop, latencies))
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, model, p, args) for p in prompts(args, args.vocab_size)))
        wall = time.perf_counter() - start
        stop.set()
        await probe
        ready_after = await client.get("/ready", timeout=5)
        metrics = (await client.get("/metrics")).text
    return {"wall_s": wall, "tokens": sum(tokens), "tok_s": sum(tokens) / wall,
            "preemptions": counter(metrics, "num_preemptions"),
            "recomputed": counter(metrics, "num_recomputed_tokens"),
            "ready_max_s": max(latencies, default=float("nan")), "ready_after": ready_after.status_code}


def run_pool(num_blocks: int, args) -> dict:
    server_args = ["--num-kv-blocks", str(num_blocks), "--block-size", str(BLOCK_SIZE), *args.server_arg]
    if args.model:
        server_args.insert(0, args.model)
    server = ServerProcess(server_args, announce=True)
    try:
        server.wait_ready()
        result = asyncio.run(workload(server.url, args))
    finally:
        server.stop()
    print(f"{num_blocks:>6} blocks: {result['wall_s']:7.1f} s wall, {result['tokens']} output tokens, "
          f"{result['tok_s']:6.1f} tok/s, {result['preemptions']:.0f} preemptions, "
          f"{result['recomputed']:.0f} recomputed tokens, slowest /ready {result['ready_max_s']:.3f} s, "
          f"/ready after: {result['ready_after']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"workload: {args.num_prompts} x {args.input_len}-token prompts, max_tokens {args.output_len}, "
          f"ignore_eos, all at once", flush=True)
    results = {}
    if args.only in (None, "small"):
        results["small"] = run_pool(args.num_kv_blocks, args)
    if args.only in (None, "fit"):
        results["fit"] = run_pool(fit_blocks(args), args)
    if len(results) == 2:
        print(f"small / fit wall time: {results['small']['wall_s'] / results['fit']['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
