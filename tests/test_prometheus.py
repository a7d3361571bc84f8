"""A real Prometheus server scrapes our /metrics; we check what it stored, and promtool lints it.

Two targets: a small exporter process (this file, run as `python tests/test_prometheus.py
PORT K`) serving ServerMetrics.render() after K synthetic requests, which tests the
exposition on its own; and the real `gateway serve` (bench/server_process.py), which runs
wherever the CLI has a `serve` command (a capability check, not a grep of the source).
Prometheus comes from Debian's package via scripts/get_prometheus.sh (cached in .tools/).

promtool lints two things we keep on purpose, because vLLM's names have them and dashboards
depend on the names: the ':' in every name (promtool reserves it for recording rules) and
the `_total` suffix of the histogram iteration_tokens_total. Anything else fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
K = 5
ACCEPTED_LINT = ("metric names should not contain ':'",
                 'iteration_tokens_total non-counter metrics should not have "_total" suffix')

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- process helpers

from procs import free_port, gateway_serve_available, stop, wait_http  # noqa: E402  (shared process helpers)


@pytest.fixture(scope="session")
def prom_bin() -> Path:
    if shutil.which("apt-get") is None and not (ROOT / ".tools/prom/usr/bin/prometheus").exists():
        pytest.skip("no apt-get to fetch prometheus with")
    done = subprocess.run(["bash", str(ROOT / "scripts/get_prometheus.sh")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


class Prometheus:
    """A Prometheus server scraping one target every second; query() returns the vector."""

    def __init__(self, bin_dir: Path, target_port: int, workdir: Path):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.proc = subprocess.Popen(
            [str(bin_dir / "prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.port}/-/ready", self.proc, timeout=60)

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/query",
                             params={"query": promql}, timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, timeout: float = 45) -> None:
        """Polls until the query equals expected: the first scrape lands seconds after start."""
        deadline, got = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            got = self.scalar(promql)
            if got == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{promql} = {got}, expected {expected}")


def promtool_problems(bin_dir: Path, exposition: str) -> list[str]:
    done = subprocess.run([str(bin_dir / "promtool"), "check", "metrics"], input=exposition,
                          capture_output=True, text=True, timeout=30)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode in (0, 3), lines   # 3 = lint findings; anything else = unparsable
    return [ln for ln in lines if ln.strip() and not any(a in ln for a in ACCEPTED_LINT)]


# ---------------------------------------------------------------- the synthetic exporter

def synthetic_records(k: int):
    from gateway.engine.messages import RequestRecord

    return [RequestRecord(arrival_time=10.0 * i, finish_time=10.0 * i + 0.5,
                          first_scheduled_time=10.0 * i + 0.01,
                          token_times=[10.0 * i + 0.1 + 0.05 * j for j in range(i + 2)],
                          num_prompt_tokens=20, num_generation_tokens=i + 2,
                          finish_reason="stop" if i % 2 else "length", max_tokens=32)
            for i in range(k)]


def serve_synthetic(port: int, k: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from gateway.engine.messages import StepStats
    from gateway.metrics import ServerMetrics

    metrics = ServerMetrics("synthetic", compat_vllm=True)
    for rec in synthetic_records(k):
        metrics.on_step(StepStats(num_running=1, num_batched_tokens=rec.num_prompt_tokens))
        metrics.on_request_finished(rec)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body, content_type = metrics.render()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):   # keep the test output clean
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def test_prometheus_scrapes_the_synthetic_exposition(prom_bin, tmp_path):
    port = free_port()
    exporter = subprocess.Popen([sys.executable, __file__, str(port), str(K)], cwd=ROOT)
    prom = None
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", exporter, timeout=30)
        prom = Prometheus(prom_bin, port, tmp_path)
        prom.wait_for('up{job="gateway"}', 1.0)
        records = synthetic_records(K)
        for prefix in ("gateway:", "vllm:"):
            prom.wait_for(f"sum({prefix}request_success_total)", K)
            assert prom.scalar(f"{prefix}e2e_request_latency_seconds_count") == K
            assert prom.scalar(f"{prefix}time_to_first_token_seconds_count") == K
            assert prom.scalar(f"{prefix}generation_tokens_total") == sum(
                r.num_generation_tokens for r in records)
        stops = prom.scalar('gateway:request_success_total{finished_reason="stop"}')
        assert stops == sum(r.finish_reason == "stop" for r in records)
        assert prom.scalar('gateway:iteration_tokens_total_count{model_name="synthetic"}') == K
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert promtool_problems(prom_bin, text) == []
    finally:
        if prom is not None:
            stop(prom.proc)
        stop(exporter)


# ---------------------------------------------------------------- the real server

@pytest.mark.skipif(not gateway_serve_available(), reason="this gateway has no `serve` command")
def test_prometheus_scrapes_the_real_gateway(prom_bin, tmp_path):
    from openai import OpenAI
    from server_process import ServerProcess   # bench/, on the path via conftest (this file also
                                               # runs as a script, the synthetic exporter)
    prom = None
    with ServerProcess(["--metrics-compat", "vllm"], start_timeout_s=300, stop_timeout_s=30) as server:
        port = server.port
        try:
            prom = Prometheus(prom_bin, port, tmp_path)
            prom.wait_for('up{job="gateway"}', 1.0)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
            model = client.models.list().data[0].id
            prompt_tokens = completion_tokens = 0
            for i in range(K):
                reply = client.chat.completions.create(
                    model=model, max_tokens=4, temperature=0,
                    messages=[{"role": "user", "content": f"Count to {i + 3}."}])
                prompt_tokens += reply.usage.prompt_tokens
                completion_tokens += reply.usage.completion_tokens
            for prefix in ("gateway:", "vllm:"):
                prom.wait_for(f"sum({prefix}request_success_total)", K)
                assert prom.scalar(f"sum({prefix}e2e_request_latency_seconds_count)") == K
                assert prom.scalar(f"sum({prefix}time_to_first_token_seconds_count)") == K
                assert prom.scalar(f"sum({prefix}generation_tokens_total)") == completion_tokens
                assert prom.scalar(f"sum({prefix}prompt_tokens_total)") == prompt_tokens
                assert prom.scalar(f"sum({prefix}iteration_tokens_total_count)") > 0
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert promtool_problems(prom_bin, text) == []
        finally:
            if prom is not None:
                stop(prom.proc)


if __name__ == "__main__":   # the synthetic exporter, for the first test
    sys.path.insert(0, str(ROOT))   # run as a script, tests/ is on the path, not the root
    serve_synthetic(int(sys.argv[1]), int(sys.argv[2]))
