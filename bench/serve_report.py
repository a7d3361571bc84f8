"""Turns per-request outputs into the figures `vllm bench serve` reports, under its JSON keys.

calculate_metrics is pure (outputs in, dict out); print_report writes the table in vLLM's
layout to stdout. Definitions (as in vllm/benchmarks/serve.py):
  TTFT  send → first text-bearing chunk           TPOT  (E2EL − TTFT) / (output tokens − 1)
  ITL   gap between consecutive text chunks        E2EL  send → end of stream
  peak output throughput: most output tokens in one 1-second bucket counted from the first
  request's send time; max_concurrent_requests: most requests active in one such bucket.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serve_client import RequestOutput

METRIC_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
DETAILED_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")


def per_second_series(outputs: list[RequestOutput]) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens and active requests in each 1 s bucket from the first send."""
    done = [o for o in outputs if o.success]
    if not done:
        return np.zeros(0), np.zeros(0)
    start = min(o.start_time for o in done)
    end = max(o.start_time + o.latency for o in done)
    seconds = int(math.ceil(end - start)) + 1
    tokens = np.zeros(seconds)
    active = np.zeros(seconds)
    for o in done:
        offset = o.start_time - start
        if o.chunk_times:
            # A chunk may carry several tokens: spread the usage count over the chunks so
            # the series sums to the reported total.
            weight = o.output_tokens / len(o.chunk_times)
            for t in o.chunk_times:
                tokens[int(offset + t)] += weight
        active[int(offset): int(offset + o.latency) + 1] += 1
    return tokens, active


def _stats(name: str, values: list[float], percentiles: list[float]) -> dict[str, float]:
    data = np.asarray(values or [0.0]) * 1000.0   # seconds → ms; 0 when nothing was measured
    out = {f"mean_{name}_ms": float(np.mean(data)), f"median_{name}_ms": float(np.median(data)),
           f"std_{name}_ms": float(np.std(data))}
    for p in percentiles:
        out[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(data, p))
    return out


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def latency_samples(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    """Seconds, over successful requests: ttft, tpot (only >1 token), itl, e2el."""
    samples: dict[str, list[float]] = {"ttft": [], "tpot": [], "itl": [], "e2el": []}
    for o in outputs:
        if not o.success:
            continue
        samples["ttft"].append(o.ttft)
        samples["e2el"].append(o.latency)
        samples["itl"].extend(o.itl)
        if o.output_tokens > 1:
            samples["tpot"].append((o.latency - o.ttft) / (o.output_tokens - 1))
    return samples


def calculate_metrics(outputs: list[RequestOutput], duration: float,
                      selected_metrics: list[str], percentiles: list[float]) -> dict[str, Any]:
    done = [o for o in outputs if o.success]
    output_lens = [o.output_tokens if o.success else 0 for o in outputs]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(output_lens)
    tokens, active = per_second_series(outputs)
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "request_goodput": None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
        "max_output_tokens_per_s": float(tokens.max()) if tokens.size else 0.0,
        "max_concurrent_requests": int(active.max()) if active.size else 0,
    }
    samples = latency_samples(outputs)
    for name in METRIC_HEADERS:   # vLLM's order: ttft, tpot, itl, e2el
        if name in selected_metrics:
            result.update(_stats(name, samples[name], percentiles))
    return result


def _row(label: str, value: Any, fmt: str = "") -> None:
    print(("{:<40} {:<10" + fmt + "}").format(label, value))


def print_report(result: dict[str, Any], selected_metrics: list[str], percentiles: list[float],
                 max_concurrency: int | None, request_rate: float) -> None:
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    _row("Successful requests:", result["completed"])
    _row("Failed requests:", result["failed"])
    if max_concurrency is not None:
        _row("Maximum request concurrency:", max_concurrency)
    if request_rate != float("inf"):
        _row("Request rate configured (RPS):", request_rate, ".2f")
    _row("Benchmark duration (s):", result["duration"], ".2f")
    _row("Total input tokens:", result["total_input_tokens"])
    _row("Total generated tokens:", result["total_output_tokens"])
    _row("Request throughput (req/s):", result["request_throughput"], ".2f")
    _row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    _row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f")
    _row("Peak concurrent requests:", result["max_concurrent_requests"], ".2f")
    _row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for name, (short, header) in METRIC_HEADERS.items():
        if name not in selected_metrics:
            continue
        print("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        _row(f"Mean {short} (ms):", result[f"mean_{name}_ms"], ".2f")
        _row(f"Median {short} (ms):", result[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            word = percentile_word(p)
            _row(f"P{word} {short} (ms):", result[f"p{word}_{name}_ms"], ".2f")
    print("=" * 50)
