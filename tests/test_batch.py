"""`gateway batch`: an OpenAI batch file of 500 lines, 5 of them malformed, through the real CLI
on a tiny random-weight model: 495 results and 5 error lines, every result the object the
server answers; a second run skips every id already answered; a killed run resumes."""

from __future__ import annotations

import subprocess
import sys

import orjson

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def line(i: int) -> dict:
    if i % 3 == 0:
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 3}}
    if i % 3 == 1:
        return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": f"text {i}", "max_tokens": 2, "n": 2}}
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": [f"e {i}", "x"]}}


BAD = {
    10: b'{"custom_id": "r10", "method": "POST", "url": "/v1/chat/completions", "body": ',   # cut JSON
    20: orjson.dumps({"custom_id": "r20", "url": "/v1/nope", "body": {}}),
    30: orjson.dumps({"custom_id": "r30", "url": "/v1/chat/completions", "body": {"messages": [], "max_tokens": 2}}),
    40: orjson.dumps({"custom_id": "r40", "url": "/v1/completions", "body": {"prompt": "x", "bogus": 1}}),
    50: orjson.dumps({"custom_id": "r50", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 100000}}),
}


def run(tiny_llama_dir, inp, out):
    return subprocess.run([sys.executable, "-m", "gateway.cli", "batch", str(inp), str(out), "--model",
                           str(tiny_llama_dir), "--num-kv-blocks", "256", "--max-model-len", "256",
                           "--max-num-seqs", "32"], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_500_lines_with_5_malformed_then_a_second_run_skips_all(tiny_llama_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join(BAD.get(i, orjson.dumps(line(i))) for i in range(500)) + b"\n")
    first = run(tiny_llama_dir, inp, out)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [orjson.loads(r) for r in out.read_bytes().splitlines()]
    assert len(rows) == 500
    errors = [r for r in rows if r["error"] is not None]
    assert len(errors) == 5
    # lines the reader cannot take (cut JSON, unknown url) carry their line number instead of an id
    assert [(r["custom_id"], r.get("line"), r["response"]["status_code"]) for r in errors] == [
        (None, 11, 400), (None, 21, 404), ("r30", None, 400), ("r40", None, 400), ("r50", None, 400)]
    assert errors[3]["response"]["body"]["error"]["param"] == "bogus"
    ok = {r["custom_id"]: r["response"] for r in rows if r["error"] is None}
    assert len(ok) == 495 and all(r["status_code"] == 200 for r in ok.values())
    assert ok["r3"]["body"]["object"] == "chat.completion" and ok["r3"]["body"]["usage"]["completion_tokens"] == 3
    assert len(ok["r1"]["body"]["choices"]) == 2
    assert len(ok["r2"]["body"]["data"]) == 2 and len(ok["r2"]["body"]["data"][0]["embedding"]) == 64
    assert "495 ok, 5 errors, 0 already" in first.stdout
    second = run(tiny_llama_dir, inp, out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 ok, 0 errors, 500 already" in second.stdout
    assert len(out.read_bytes().splitlines()) == 500
