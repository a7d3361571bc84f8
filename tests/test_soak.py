"""The soak bench in quick mode: bench/soak.py starts its own server with the default model
and a KV pool small enough to force preemption, sends 80 mixed requests (valid, dropped
mid-stream, deadlines, invalid) with more clients than the server admits, and must report
nothing lost, no 5xx and no KV block left in use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_quick_soak_loses_nothing_and_returns_every_block(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--num-requests", "80", "--json", str(out)],
                          capture_output=True, text=True, timeout=1500)
    figures = json.loads(out.read_text()) if out.exists() else {}
    # the soak's own verdict and its "!" lines first: the output's tail is the server's log
    problems = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("! ")][:10]
    assert proc.returncode == 0, (figures.get("failures"), problems, proc.stdout[-2000:] + proc.stderr[-2000:])
    assert figures["failures"] == [] and figures["requests"] == 80
    assert figures["lost"] == 0 and figures["responses >= 500"] == 0 and figures["KV blocks in use at the end"] == 0
    assert figures["unexpected outcomes"] == 0
    assert figures["completed"] > 0 and figures["dropped by the client mid-stream"] > 0
    assert figures["errors by status code"].get("400", 0) > 0   # the invalid requests were refused
    assert figures["429 answers retried"] > 0                     # more clients than the server admits
    assert figures["preemptions observed"] > 0                    # the small pool forced preemption
    assert "RESULT: PASS" in proc.stdout
