"""Every Triton kernel compiles ahead of time to a cubin for sm_90 (H100) and sm_80 (A100)
without a GPU, for the dtype / head-dim / block-size / GQA configs the dispatch launches.

This catches what the interpreter lets through: tl.dot shape limits (K >= 16), dtype rules,
and shared memory over the target's per-block limit. Compilation runs in a subprocess
(python -m gateway.kernels.triton_aot) with TRITON_INTERPRET removed, because kernels
decorated under the interpreter (tests/test_kernels.py sets it) cannot be compiled, and
with a private TRITON_CACHE_DIR so every run really compiles."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.triton


def run_aot(tmp_path, *args: str) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "gateway.kernels.triton_aot", *args],
                          capture_output=True, text=True, env=env, timeout=400)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, reports, proc.stderr[-3000:]


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_to_cubin_within_shared_memory(tmp_path, arch):
    rc, reports, stderr = run_aot(tmp_path, "--arch", str(arch))
    failures = [r for r in reports if not r["ok"]]
    assert rc == 0 and not failures, (failures, stderr)
    names = {r["name"].split("_")[0] for r in reports}
    assert names == {"prefill", "decode", "reduce", "store", "rotary", "silu", "rms"}
    assert all(r["stage"] == "cubin" and r["shared"] <= r["shared_limit"] for r in reports)
    # 16-bit attention dots must land on tensor cores (wgmma for sm_90 prefill tiles).
    for r in reports:
        if r["name"].startswith(("prefill", "decode")) and "fp32" not in r["name"]:
            assert r["mma"] in ("mma", "wgmma"), r
        if arch == 90 and r["name"].startswith("prefill") and "fp32" not in r["name"]:
            assert r["mma"] == "wgmma", r


def test_a_dot_with_k_below_16_fails_to_compile(tmp_path):
    """Negative control: a 8-token KV tile makes p @ v a K=8 dot, which the interpreter accepts
    but the CUDA compiler rejects, so the test above would catch such a config."""
    rc, reports, _ = run_aot(tmp_path, "--arch", "90", "--quick", "--only", "decode_split",
                             "--set", "BLOCK_N=8")
    assert rc == 1 and reports and not any(r["ok"] for r in reports)
    assert all("K >= 16" in r["error"] for r in reports)
