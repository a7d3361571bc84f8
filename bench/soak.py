"""Soak run: many mixed requests against a live gateway under KV-cache pressure, proving that
nothing is lost, nothing answers 5xx, and every KV block comes back.

    python bench/soak.py                        # 1,000 requests; starts its own server
    python bench/soak.py --num-requests 80      # quick mode (tests/test_soak.py)
    python bench/soak.py --url http://127.0.0.1:8000   # an existing server: not started or stopped

Order of events: start `gateway serve` (unless --url) on a free loopback port with a pool
small enough to force preemption (SERVER_ARGS) and wait for /ready → build a seeded plan
(soak_plan.py) → send its opening burst of pressure requests together (they outgrow the pool,
so preemption is certain) → then the rest: valid chat and completion requests of mixed lengths, streamed or not; streams
the client drops mid-way (~10%); short X-Request-Timeout deadlines; invalid requests (bad JSON,
unknown params, prompts past the context, bad logit_bias) → run it with --concurrency clients,
each retrying a 429 after its Retry-After → poll /ready until kv_blocks_in_use is 0 → read
gateway:num_preemptions_total from /metrics → print the figures → stop the server by PID.

Exit status 1 when any request was lost (accepted but never finished), any response or error
frame was a 5xx, KV blocks are still in use, an outcome contradicts the request's kind (an
invalid request accepted, a valid one refused), or the server died; else 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from server_process import ServerProcess  # noqa: E402
from soak_plan import PRESSURE_BURST, Item, Result, build_plan, run_one  # noqa: E402

SERVER_ARGS = ["--num-kv-blocks", "64", "--block-size", "16", "--max-model-len", "512",
               "--max-num-seqs", "32", "--max-waiting-requests", "8"]
START_TIMEOUT_S = 900


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an existing server; default: start one")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=34,
                   help="clients; above what the pool runs plus max-waiting-requests (8), so 429s happen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model for the started server (default: the default model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=600, help="client-side limit per request")
    p.add_argument("--server-arg", action="append", default=[], help="extra `gateway serve` argument")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


async def run_plan(url: str, plan: list[Item], concurrency: int, headers: dict, timeout: float) -> list[Result]:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    todo = iter(plan)
    results: list[Result] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30)) as client:
        async def worker() -> None:
            for item in todo:   # a shared iterator: each item goes to exactly one worker
                results.append(await run_one(client, item))
                done = len(results)
                if done % 100 == 0 or done == len(plan):
                    print(f"  {done}/{len(plan)} requests done", flush=True)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def blocks_in_use(url: str, headers: dict, settle_s: float = 60) -> int | None:
    """kv_blocks_in_use from /ready, once it reaches 0 (aborts land a moment after the clients leave)."""
    deadline = time.monotonic() + settle_s
    while True:
        in_use = httpx.get(url + "/ready", headers=headers, timeout=10).json().get("kv_blocks_in_use")
        if in_use == 0 or time.monotonic() > deadline:
            return in_use
        time.sleep(0.2)


def preemptions(url: str, headers: dict) -> int:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return int(sum(float(m) for m in re.findall(r"^gateway:num_preemptions_total\{[^}]*\} (\S+)$", text, re.M)))


def summarize(results: list[Result]) -> dict:
    outcomes = Counter(r.outcome for r in results)
    return {
        "requests": len(results),
        "accepted": sum(r.status == 200 for r in results),
        "completed": outcomes["completed"],
        "dropped by the client mid-stream": outcomes["dropped"],
        "deadline expired (408 or error frame)": sum(r.deadline_expired for r in results),
        "errors by status code": dict(sorted(Counter(r.status for r in results if r.status != 200).items(),
                                             key=lambda kv: str(kv[0]))),
        "error frames by code": dict(Counter(r.frame_error for r in results if r.frame_error)),
        "429 answers retried": sum(r.throttled for r in results),
        "gave up after repeated 429s": sum(r.gave_up for r in results),
        "lost": outcomes["lost"],
        "responses >= 500": sum(r.server_error for r in results),
        "unexpected outcomes": sum(not r.as_expected for r in results),
        "generated tokens": sum(r.tokens for r in results),
    }


def report(figures: dict, elapsed: float, concurrency: int) -> None:
    print(f"\nsoak: {figures['requests']} requests, concurrency {concurrency}, {elapsed:.1f} s "
          f"({figures['requests'] / elapsed:.2f} req/s)")
    for name, value in figures.items():
        print(f"  {name:<40} {value}")


def failures(figures: dict, server_alive: bool) -> list[str]:
    checks = [(figures["lost"] > 0, "requests were lost"), (figures["responses >= 500"] > 0, "5xx answers"),
              (figures["KV blocks in use at the end"] != 0, "KV blocks still in use"),
              (figures["unexpected outcomes"] > 0, "unexpected outcomes"), (not server_alive, "the server died")]
    return [message for failed, message in checks if failed]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    if not args.url:
        server_args = [*([args.model] if args.model else []), "--log-level", "warning", *SERVER_ARGS, *args.server_arg]
        server = ServerProcess(server_args, START_TIMEOUT_S, announce=True)
    try:
        if server is not None:
            server.wait_ready()
        url = args.url or server.url
        plan = build_plan(args.num_requests, args.seed)
        print(f"plan: {dict(Counter(item.kind for item in plan))}", flush=True)
        start = time.monotonic()
        burst, rest = plan[:PRESSURE_BURST], plan[PRESSURE_BURST:]
        results = asyncio.run(run_plan(url, burst, len(burst), headers, args.request_timeout))
        results += asyncio.run(run_plan(url, rest, args.concurrency, headers, args.request_timeout))
        elapsed = time.monotonic() - start
        figures = summarize(results)
        figures["KV blocks in use at the end"] = blocks_in_use(url, headers)
        figures["preemptions observed"] = preemptions(url, headers)
        report(figures, elapsed, args.concurrency)
        for r in [r for r in results if not r.as_expected or r.outcome == "lost"][:10]:
            print(f"  ! {r.kind}: status {r.status}, outcome {r.outcome}, {r.detail[:200]}")
        alive = server is None or server.proc.poll() is None
        problems = failures(figures, alive)
        if args.json:
            saved = {**figures, "elapsed_s": elapsed, "failures": problems}
            Path(args.json).write_text(json.dumps(saved, indent=1))
        print("RESULT:", "FAIL (" + ", ".join(problems) + ")" if problems else "PASS", flush=True)
        if problems and server is not None:
            print(server.tail())
        return 1 if problems else 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
