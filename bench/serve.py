"""Load benchmark for any OpenAI-compatible server, reporting what `vllm bench serve` reports.

    python bench/serve.py --base-url http://127.0.0.1:8000 --dataset random \
        --random-input-len 256 --random-output-len 64 --num-prompts 50 --max-concurrency 8

Order of events: parse arguments → build prompts (serve_datasets) → pick the model (GET
/v1/models unless --model) → one test request until the server answers (ready check) →
--num-warmups untimed requests → the timed run: requests released on a Poisson/gamma
schedule (--request-rate, --burstiness) and/or capped by --max-concurrency, each streamed
and timed (serve_client) → figures computed and printed as vLLM prints them
(serve_report) → optional JSON (--save-result) and PNG (--plot, serve_plot).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path

# The serve_* helpers sit next to this file; make them importable however it is launched.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from serve_client import RequestOutput, build_payload, first_model_id, send_request  # noqa: E402
from serve_datasets import SampleRequest, get_samples  # noqa: E402
from serve_report import DETAILED_KEYS, METRIC_HEADERS, calculate_metrics, print_report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint-type", choices=["chat", "completions"], default="chat")
    p.add_argument("--endpoint", default=None, help="path; default from --endpoint-type")
    p.add_argument("--model", default=None, help="default: first id from GET /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--tokenizer", default=None, help="HF dir or .gguf for exact prompt lengths")
    p.add_argument("--dataset", choices=["random", "prefix-repetition", "jsonl"], default="random")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128,
                   help="output length for random/prefix-repetition; default max_tokens for jsonl")
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--suffix-len", type=int, default=256)
    p.add_argument("--num-prefixes", type=int, default=10)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for synthetic datasets (exact output lengths), off for jsonl")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into bodies")
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--ready-check-timeout-sec", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--label", default=None)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="keep per-request lists")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--plot", default=None, metavar="OUT.png")
    args = p.parse_args(argv)
    if args.burstiness <= 0:
        p.error("--burstiness must be > 0")
    if args.ignore_eos is None:
        args.ignore_eos = args.dataset != "jsonl"
    unknown = set(args.percentile_metrics.split(",")) - set(METRIC_HEADERS)
    if unknown:
        p.error(f"--percentile-metrics: unknown {sorted(unknown)}; use {list(METRIC_HEADERS)}")
    return args


def arrival_offsets(count: int, rate: float, burstiness: float,
                    rng: np.random.Generator) -> list[float]:
    """Send time of each request, in seconds from the start. Gaps are gamma-distributed with
    shape=burstiness and mean 1/rate (burstiness 1 = Poisson); the total is rescaled to
    count/rate so that runs with different seeds offer the same average load (as vLLM)."""
    if rate == float("inf"):
        return [0.0] * count
    if burstiness == float("inf"):
        gaps = np.full(count, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    offsets = np.cumsum(gaps)
    return list(offsets * (count / rate) / offsets[-1])


class Runner:
    """Holds what every request of one run shares: client, URL, headers, sampling options."""

    def __init__(self, args: argparse.Namespace, client: httpx.AsyncClient, base_url: str):
        self.args = args
        self.client = client
        path = args.endpoint or ("/v1/chat/completions" if args.endpoint_type == "chat"
                                 else "/v1/completions")
        self.url = base_url + path
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.extra = {"temperature": args.temperature, **(args.extra_body or {})}
        self.model = args.model

    async def one(self, sample: SampleRequest) -> RequestOutput:
        payload = build_payload(self.args.endpoint_type, self.model, sample,
                                self.args.ignore_eos, self.extra)
        return await send_request(self.client, self.url, payload, sample, self.headers)

    async def wait_ready(self, sample: SampleRequest) -> None:
        """Retries the first prompt until it succeeds; a server still starting refuses
        connections, which is not a benchmark failure."""
        deadline = time.monotonic() + self.args.ready_check_timeout_sec
        while True:
            out = await self.one(sample)
            if out.success:
                return
            if time.monotonic() > deadline or out.error.startswith("HTTP"):
                raise SystemExit(f"Initial test run failed: {out.error}")
            await asyncio.sleep(1.0)

    async def run(self, samples: list[SampleRequest], offsets: list[float],
                  limit: int | None, bar: tqdm | None) -> list[RequestOutput]:
        gate = asyncio.Semaphore(limit) if limit else contextlib.nullcontext()

        async def limited(sample: SampleRequest) -> RequestOutput:
            async with gate:
                out = await self.one(sample)
            if bar is not None:
                bar.update(1)
            return out

        start = time.perf_counter()
        tasks = []
        for sample, offset in zip(samples, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(sample)))
        return await asyncio.gather(*tasks)


def result_path(args: argparse.Namespace, model_id: str, stamp: str) -> str:
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    name = args.result_filename or (
        f"{args.label or 'openai'}-{args.request_rate}qps{concurrency}-"
        f"{model_id.split('/')[-1]}-{stamp}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


async def main_async(args: argparse.Namespace) -> dict:
    samples = get_samples(args, random.Random(args.seed))
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(6 * 3600.0), limits=limits) as client:
        runner = Runner(args, client, base_url)
        if runner.model is None:
            runner.model = await first_model_id(client, base_url, runner.headers)
            print(f"Using model: {runner.model}")
        if args.ready_check_timeout_sec > 0:
            print("Starting initial single prompt test run...")
            await runner.wait_ready(samples[0])
            print("Initial test run completed.")
        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            await runner.run([samples[0]] * args.num_warmups, [0.0] * args.num_warmups,
                             args.max_concurrency, None)
        print(f"Traffic request rate: {args.request_rate}")
        shape = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Burstiness factor: {args.burstiness} ({shape})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        offsets = arrival_offsets(len(samples), args.request_rate, args.burstiness,
                                  np.random.default_rng(args.seed))
        bar = None if args.disable_tqdm else tqdm(total=len(samples))
        start = time.perf_counter()
        outputs = await runner.run(samples, offsets, args.max_concurrency, bar)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    metrics = args.percentile_metrics.split(",")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    result = calculate_metrics(outputs, duration, metrics, percentiles)
    print_report(result, metrics, percentiles, args.max_concurrency, args.request_rate)
    if args.plot:
        from serve_plot import plot

        plot(outputs, args.plot, f"{runner.model} @ {base_url} ({args.dataset})")
    return finish(args, runner.model, result)


def finish(args: argparse.Namespace, model_id: str, result: dict) -> dict:
    """Prefix the run's settings (vLLM's result layout) and save when asked."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backend = "openai-chat" if args.endpoint_type == "chat" else "openai"   # vLLM's names
    header = {"date": stamp, "endpoint_type": backend, "backend": backend, "label": args.label,
        "model_id": model_id, "tokenizer_id": args.tokenizer or model_id,
        "num_prompts": args.num_prompts, "dataset": args.dataset,
        "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency}
    full = {**header, **result}
    if not args.save_detailed:
        for key in DETAILED_KEYS:
            full.pop(key, None)
    if args.save_result:
        path = result_path(args, model_id, stamp)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(full, handle)
        print(f"Saved result to {path}")
    return full


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
