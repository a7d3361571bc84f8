"""Soak run: many mixed requests against a live gateway under KV-cache pressure, proving that
nothing is lost, nothing answers 5xx, and every KV block comes back.

    python bench/soak.py                        # 1,000 requests; starts its own server
    python bench/soak.py --num-requests 80      # quick mode (tests/test_soak.py)
    python bench/soak.py --url http://127.0.0.1:8000   # an existing server: not started or stopped
    python bench/soak.py --duration 1800 --concurrency 16 --mix issue21   # 30 minutes, issue 21's mix

Order of events: start `gateway serve` (unless --url) on a free loopback port with a pool
small enough to force preemption (SERVER_ARGS) and wait for /ready → build a seeded plan
(soak_plan.py) → send its opening burst of pressure requests together (they outgrow the pool,
so preemption is certain) → then the rest: valid chat and completion requests of mixed lengths, streamed or not; streams
the client drops mid-way (~10%); short X-Request-Timeout deadlines; invalid requests (bad JSON,
unknown params, prompts past the context, bad logit_bias) → run it with --concurrency clients,
each retrying a 429 after its Retry-After → poll /ready until kv_blocks_in_use is 0 → read
gateway:num_preemptions_total from /metrics → print the figures → stop the server by PID.
With --duration S the plan has no end: clients keep taking requests until S seconds have
passed, then finish the one in hand. --mix names the shares (soak_plan.MIXES). The server's
RSS (its process and children, from /proc) is read once it is ready, every RSS_EVERY_S
seconds while the load runs (a leak grows steadily; warm-up levels off), and at the end.

Exit status 1 when any request was lost (accepted but never finished), any response or error
frame was a 5xx, KV blocks are still in use, an outcome contradicts the request's kind (an
invalid request accepted, a valid one refused), or the server died; else 0."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from server_process import ServerProcess  # noqa: E402
from soak_plan import MIXES, PRESSURE_BURST, Item, Result, build_plan, iter_plan, run_one  # noqa: E402

SERVER_ARGS = ["--num-kv-blocks", "64", "--block-size", "16", "--max-model-len", "512",
               "--max-num-seqs", "32", "--max-waiting-requests", "8"]
START_TIMEOUT_S = 900
RSS_EVERY_S = 60


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an existing server; default: start one")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--duration", type=float, default=None,
                   help="seconds to keep sending (the plan has no end); overrides --num-requests")
    p.add_argument("--mix", choices=sorted(MIXES), default="default", help="shares of request kinds")
    p.add_argument("--concurrency", type=int, default=34,
                   help="clients; above what the pool runs plus max-waiting-requests (8), so 429s happen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model for the started server (default: the default model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=600, help="client-side limit per request")
    p.add_argument("--server-arg", action="append", default=[], help="extra `gateway serve` argument")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


async def run_plan(url: str, plan: Iterable[Item], concurrency: int, headers: dict, timeout: float,
                   until: float | None = None) -> list[Result]:
    """Send the plan's items with `concurrency` clients; with `until` (a monotonic time) a
    client takes no new item after it, so an endless plan works."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    todo = iter(plan)
    total = len(plan) if isinstance(plan, list) else None
    results: list[Result] = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30)) as client:
        async def worker() -> None:
            for item in todo:   # a shared iterator: each item goes to exactly one worker
                if until is not None and time.monotonic() >= until:
                    return
                results.append(await run_one(client, item))
                done = len(results)
                if done % (100 if total else 500) == 0 or done == total:
                    print(f"  {done}/{total or '-'} requests done, {time.monotonic() - started:.0f} s", flush=True)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def rss_mb(pid: int) -> float | None:
    """Resident memory of pid and its descendants, in MB (None once it is gone)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            if p == pid:
                return None
        todo += children.get(p, [])
    return round(total / 1e6, 1)


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
        "answered": sum(isinstance(r.status, int) for r in results),
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


def split_plan(args: argparse.Namespace) -> tuple[list[Item], Iterable[Item]]:
    """(the opening pressure burst, the rest): a list of --num-requests, or endless with --duration."""
    kinds = MIXES[args.mix]
    if args.duration is None:
        plan = build_plan(args.num_requests, args.seed, kinds)
        print(f"plan: {dict(Counter(item.kind for item in plan))}", flush=True)
        return plan[:PRESSURE_BURST], plan[PRESSURE_BURST:]
    endless = iter_plan(args.seed, kinds)
    print(f"plan: {PRESSURE_BURST} pressure, then the {args.mix} mix {kinds} for {args.duration:g} s", flush=True)
    return list(itertools.islice(endless, PRESSURE_BURST)), endless


def sample_rss(pid: int, samples: list, stop: threading.Event) -> None:
    """Append the RSS in MB every RSS_EVERY_S until stop is set."""
    while not stop.wait(RSS_EVERY_S):
        samples.append(rss_mb(pid))


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
        burst, rest = split_plan(args)
        rss_start = rss_mb(server.proc.pid) if server is not None else None
        rss_samples: list = []
        stop_sampling = threading.Event()
        if server is not None:
            threading.Thread(target=sample_rss, args=(server.proc.pid, rss_samples, stop_sampling), daemon=True).start()
        start = time.monotonic()
        until = None if args.duration is None else start + args.duration
        results = asyncio.run(run_plan(url, burst, len(burst), headers, args.request_timeout))
        results += asyncio.run(run_plan(url, rest, args.concurrency, headers, args.request_timeout, until))
        elapsed = time.monotonic() - start
        stop_sampling.set()
        figures = summarize(results)
        figures["KV blocks in use at the end"] = blocks_in_use(url, headers)
        figures["preemptions observed"] = preemptions(url, headers)
        figures["requests by kind"] = dict(Counter(r.kind for r in results))
        figures["server RSS MB at start, end"] = [rss_start, rss_mb(server.proc.pid) if server else None]
        figures["server RSS MB every minute"] = rss_samples
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
