"""The Grafana dashboard(s) in helm/gateway/dashboards/: each parses as a Grafana dashboard
(schemaVersion, unique panel ids, a Prometheus datasource variable that every panel uses, the
`prefix` variable offering gateway: and vllm:), and every panel's PromQL, with the variables
substituted as Grafana would, returns at least one series from a real Prometheus scraping a
real `gateway serve` (tiny random-weight model, --metrics-compat vllm) that has served
traffic: a typo'd metric or label name returns nothing and fails here.

Prometheus and its helpers come from tests/test_prometheus.py (scripts/get_prometheus.sh)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from procs import gateway_serve_available, stop
from test_prometheus import Prometheus, prom_bin  # noqa: F401  (prom_bin: a fixture)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "helm/gateway/dashboards").glob("*.json"))
PREFIXES = ("gateway:", "vllm:")
QUERY_TIMEOUT_S = 60   # the first scrapes after traffic land within seconds; rate() needs two


def panels(items: list[dict]):
    for panel in items:   # rows nest their panels
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    return [(f"{p['id']} {p.get('title', '')}", t["expr"]) for p in panels(dashboard["panels"])
            for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str, prefix: str) -> str:
    """As Grafana renders it: the chosen prefix, model_name = All, built-in intervals 1m."""
    expr = re.sub(r"\$\{prefix\}|\$prefix\b", prefix, expr)
    expr = re.sub(r"\$\{model_name(:\w+)?\}|\$model_name\b", ".+", expr)
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "1m", expr)
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request) -> dict:
    return json.loads(request.param.read_text())


def test_there_is_a_dashboard():
    assert DASHBOARDS, "no dashboard JSON in helm/gateway/dashboards/"


def test_parses_as_a_grafana_dashboard(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 16
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert ids and len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    sources = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(sources) == 1 and sources[0]["query"] == "prometheus"
    prefix = variables["prefix"]
    assert {o["value"] for o in prefix["options"]} == set(PREFIXES)
    assert prefix["current"]["value"] == "gateway:"
    for p in panels(dashboard["panels"]):
        if p.get("targets"):   # every query goes to the chosen datasource
            assert p["datasource"]["uid"] == "${%s}" % sources[0]["name"], p["title"]
            for t in p["targets"]:
                assert "${prefix}" in t["expr"], (p["title"], t["expr"])
    assert expressions(dashboard)


def serve_traffic(url: str) -> None:
    """Finished requests (stop/length), a repeated prompt (prefix-cache hits), an aborted stream."""
    with httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        long_prompt = "Tell me about the history of the printing press in Europe. " * 6
        for i, content in enumerate([long_prompt, long_prompt, "Count to three.", "Say hi."]):
            reply = client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 6 + i, "temperature": 0,
                "messages": [{"role": "user", "content": content}]})
            assert reply.status_code == 200, reply.text
        body = {"model": model, "max_tokens": 200, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "A long story, please."}]}
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break   # leaving the block closes the connection: the server aborts it


@pytest.mark.slow
@pytest.mark.skipif(not gateway_serve_available(), reason="this gateway has no `serve` command")
def test_every_panel_query_returns_series(prom_bin, tiny_llama_dir, tmp_path):  # noqa: F811
    from server_process import ServerProcess   # bench/, on the path via conftest

    queries = {(name, substitute(expr, prefix)) for path in DASHBOARDS
               for name, expr in expressions(json.loads(path.read_text())) for prefix in PREFIXES}
    args = [str(tiny_llama_dir), "--metrics-compat", "vllm", "--max-model-len", "512",
            "--num-kv-blocks", "64", "--block-size", "16"]
    prom = None
    with ServerProcess(args, start_timeout_s=300, stop_timeout_s=30) as server:
        try:
            prom = Prometheus(prom_bin, server.port, tmp_path)
            prom.wait_for('up{job="gateway"}', 1.0)
            serve_traffic(server.url)
            prom.wait_for('sum(gateway:request_success_total{finished_reason=~"stop|length"})', 4.0)
            deadline, empty = time.monotonic() + QUERY_TIMEOUT_S, sorted(queries)
            while empty and time.monotonic() < deadline:   # rate() waits for a second scrape
                empty = [(name, q) for name, q in empty if not prom.query(q)]
                if empty:
                    time.sleep(1)
            assert empty == [], "panel queries with no series:\n" + "\n".join(f"{n}: {q}" for n, q in empty)
        finally:
            if prom is not None:
                stop(prom.proc)
