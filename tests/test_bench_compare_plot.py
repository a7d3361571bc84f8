"""bench/compare_plot.py: which result files it reads and how it labels them, and that it
renders a PNG from a synthetic side-by-side folder (files as side_by_side.sh names them,
contents with loadgen.py's keys)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_plot  # noqa: E402


def result(tok_s: float, ttft: float, tpot: float) -> dict:
    return {"output_throughput": tok_s, "successful": 8, "failed": 0,
            "ttft_ms": {"mean": ttft, "p50": ttft, "p90": ttft * 1.5, "p99": ttft * 2},
            "tpot_ms": {"mean": tpot, "p50": tpot, "p99": tpot * 1.3},
            "itl_ms": {"mean": tpot, "p50": tpot, "p99": tpot * 3},
            "e2el_ms": {"mean": 900.0, "p50": 880.0, "p99": 1500.0}}


@pytest.fixture
def side_by_side(tmp_path) -> Path:
    files = {"gateway-W1": result(310, 120, 40), "gateway-W2": result(520, 900, 95),
             "gateway-W3": result(60, 30, 16), "vllm-W1": result(250, 200, 55),
             "vllm-W2": result(480, 1400, 110), "vllm-W3": result(55, 45, 17),
             "llama-t1-W3": result(48, 25, 20), "llama-t2-W3": result(70, 20, 14),
             "gateway-W1-again": result(305, 125, 41),
             "vllm-W10": {"output_throughput": 0, "failed": 8}}   # a run where everything failed
    for name, body in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body) + "\n")
    (tmp_path / "gateway-W1.log").write_text("not a result")
    (tmp_path / "notes.json").write_text("{}")   # no workload in its name: not a run
    return tmp_path


def test_load_runs_names_servers_and_workloads(side_by_side):
    runs, skipped = compare_plot.load_runs(side_by_side)
    pairs = {(r.server, r.workload) for r in runs}
    assert ("llama-t2", "W3") in pairs and ("gateway again", "W1") in pairs and ("vllm", "W2") in pairs
    assert len(runs) == 9 and skipped == ["vllm-W10"]
    assert compare_plot._order(["W10", "W2", "W1"]) == ["W1", "W2", "W10"]


def test_renders_a_png(side_by_side, tmp_path):
    out = tmp_path / "cmp.png"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_plot.py"), str(side_by_side),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "9 runs, 5 servers" in done.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_empty_folder_is_an_error(tmp_path):
    assert compare_plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()
