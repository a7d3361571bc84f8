"""--plot for bench/serve.py: latency CDFs and throughput over time in one PNG.

Six panels: the empirical CDFs of TTFT, TPOT, ITL and E2E latency (ms), output tokens per
1-second bucket, and requests active per bucket. matplotlib is imported only here, with the
non-interactive Agg backend, so the benchmark runs without a display or without matplotlib
when no plot is asked for.
"""

from __future__ import annotations

import numpy as np

from serve_client import RequestOutput
from serve_report import latency_samples, per_second_series

CDF_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def _cdf(ax, values_s: list[float], title: str) -> None:
    ax.set_title(f"{title} CDF")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    if not values_s:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values_s) * 1000.0)
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(xs, ys, where="post")
    for p in (50, 99):
        ax.axvline(np.percentile(xs, p), ls="--", lw=0.8, color="grey")


def _series(ax, values: np.ndarray, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("seconds since first request")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # one bar per 1-second bucket, drawn over the second it covers
    ax.bar(np.arange(len(values)), values, width=1.0, align="edge")


def plot(outputs: list[RequestOutput], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = latency_samples(outputs)
    tokens, active = per_second_series(outputs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, label) in zip(axes.flat, CDF_PANELS):
        _cdf(ax, samples[key], label)
    _series(axes.flat[4], tokens, "Output throughput", "tokens / s")
    _series(axes.flat[5], active, "Concurrent requests", "requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
