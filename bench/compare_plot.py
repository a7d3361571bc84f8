"""Comparison plot over several load-generator result JSONs, e.g. a side-by-side run's folder:

    python bench/compare_plot.py OUT_DIR --out cmp.png

Reads every `<server>-<workload>[-<tag>].json` in OUT_DIR, as ../shared/peers/side_by_side.sh
writes them with ../shared/peers/loadgen.py (gateway-W1.json, vllm-W2.json, llama-t2-W3.json,
gateway-W1-again.json: the tag joins the server's label, "gateway again"). Three panels, one
group of bars per workload and one colour per server: output tokens/s, TTFT and TPOT (p50 the
solid bar, p99 the pale bar behind it). Every bar carries its value, so the picture reads
without the table. Runs that failed entirely (no output_throughput) are left out and named in
the title. matplotlib is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"^(?P<server>.+?)-(?P<workload>W\d+)(?:-(?P<tag>.+))?$")
LATENCY_PANELS = (("ttft_ms", "TTFT (time to first token)"), ("tpot_ms", "TPOT (time per output token)"))


@dataclass(frozen=True)
class Run:
    server: str
    workload: str
    result: dict


def load_runs(folder: Path) -> tuple[list[Run], list[str]]:
    """(runs, skipped names): skipped are files that do not parse or hold no throughput."""
    runs, skipped = [], []
    for path in sorted(folder.glob("*.json")):
        m = NAME.match(path.stem)
        if not m:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            skipped.append(path.stem)
            continue
        if not isinstance(result, dict) or not result.get("output_throughput"):
            skipped.append(path.stem)
            continue
        server = m["server"] + (f" {m['tag']}" if m["tag"] else "")
        runs.append(Run(server, m["workload"], result))
    return runs, skipped


def _order(values) -> list[str]:
    """Workloads in numeric order (W2 before W10); servers in the order they first appear."""
    seen = list(dict.fromkeys(values))
    return sorted(seen, key=lambda w: int(w[1:])) if all(re.fullmatch(r"W\d+", w) for w in seen) else seen


def _label(ax, bars, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        if height > 0:
            ax.annotate(fmt.format(height), (bar.get_x() + bar.get_width() / 2, height),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")


def _grouped(ax, runs: list[Run], workloads: list[str], servers: list[str], value, fmt: str,
             back=None) -> None:
    """One bar per (workload, server); `back` (p99) drawn pale and wider behind `value` (p50)."""
    import numpy as np

    colours = [f"C{i % 10}" for i in range(len(servers))]
    by = {(r.workload, r.server): r.result for r in runs}
    width = 0.8 / len(servers)
    x = np.arange(len(workloads))
    for i, server in enumerate(servers):
        pos = x - 0.4 + width * (i + 0.5)
        get = lambda f: [f(by[(w, server)]) if (w, server) in by else 0.0 for w in workloads]  # noqa: E731
        if back is not None:
            _label(ax, ax.bar(pos, get(back), width * 0.95, color=colours[i], alpha=0.3), fmt)
        _label(ax, ax.bar(pos, get(value), width * 0.95, color=colours[i], label=server), fmt)
    ax.set_xticks(x, workloads)
    ax.grid(axis="y", alpha=0.3)


def _pct(key: str, p: str):
    return lambda res: float((res.get(key) or {}).get(p) or 0.0)


def plot(runs: list[Run], out: Path, skipped: list[str] = (), title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = _order(r.workload for r in runs)
    servers = list(dict.fromkeys(r.server for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.2 * len(workloads) * max(2, len(servers)) / 2), 4.8))
    ax = axes[0]
    _grouped(ax, runs, workloads, servers, lambda res: float(res["output_throughput"]), "{:.0f}")
    ax.set_title("output tokens/s (higher is better)")
    ax.set_ylabel("tokens / s")
    for ax, (key, name) in zip(axes[1:], LATENCY_PANELS):
        _grouped(ax, runs, workloads, servers, _pct(key, "p50"), "{:.0f}", back=_pct(key, "p99"))
        ax.set_title(f"{name}\np50 solid, p99 pale (lower is better)", fontsize=10)
        ax.set_ylabel("ms")
    axes[0].legend(fontsize=8, loc="best")
    heading = title or "side by side"
    if skipped:
        heading += f"  (no result: {', '.join(skipped)})"
    fig.suptitle(heading)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of <server>-<workload>[-tag].json results")
    parser.add_argument("--out", type=Path, default=Path("cmp.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs, skipped = load_runs(args.folder)
    if not runs:
        print(f"no <server>-W<n>.json results with output_throughput in {args.folder}", file=sys.stderr)
        return 1
    plot(runs, args.out, skipped, args.title)
    print(f"wrote {args.out}: {len(runs)} runs, {len({r.server for r in runs})} servers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
