"""Overload, faults and hostile input: admission control (429 + Retry-After, 413, the context
limit), per-request deadlines (408), poisoned requests failing alone, and an engine crash
failing every in-flight request at once and stopping the server with EXIT_ENGINE_DEAD.

Real-engine tests run an in-process server (tests/live_server.py) over a tiny random-weight
model: one shared server for the module, and a private one for the crash. Authentication and
CORS go through config_from_args (the CLI's flags, env and key file) into the app over the
FakeEngine of test_api_app."""

import asyncio
import logging
import time

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from gateway.api.app import build_app
from gateway.api.server import EXIT_ENGINE_DEAD
from gateway.cli import build_parser, config_from_args
from gateway.config import Config
from gateway.engine.errors import RequestRejectedError
from gateway.engine.messages import EngineRequest
from gateway.sampling.params import SamplingParams
from live_server import LiveServer, run, stream
from test_api_app import FakeEngine, FakeMetrics, chat_body

# MAX_WAITING counts requests accepted but not yet scheduled: the poisoned-request test sends
# six at once, which all wait for a moment.
MAX_NUM_SEQS, MAX_WAITING, MAX_MODEL_LEN, BODY_LIMIT = 4, 8, 256, 16384
POISON = 4242   # a prompt starting with this token id fails in the engine's post-processing
TEMPLATE = ("{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('the template refuses BOOM') }}"
            "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _live(tiny_llama_dir, **config) -> LiveServer:
    return LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=MAX_MODEL_LEN,
                      **config)


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    with _live(tiny_llama_dir, max_num_seqs=MAX_NUM_SEQS, max_waiting_requests=MAX_WAITING,
               max_request_bytes=BODY_LIMIT, chat_template=str(template)) as server:
        yield server


def completion(prompt=(5, 6, 7), max_tokens=8, **fields) -> dict:
    return {"prompt": list(prompt), "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **fields}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- admission control --------------------------------------------------------------------

def test_waiting_beyond_max_waiting_requests_is_429_with_retry_after(live):
    limit = MAX_WAITING   # the engine is paused: every accepted request waits, none runs

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            live.gate.pause()   # admitted requests stay in flight until resume()
            opened = [asyncio.Event() for _ in range(limit)]
            tasks = [asyncio.create_task(stream(client, "/v1/completions", completion(max_tokens=4), e))
                     for e in opened]
            await asyncio.gather(*(e.wait() for e in opened))
            refused = await client.post("/v1/completions", json=completion())
            live.gate.resume()
            return refused, await asyncio.gather(*tasks)

    refused, accepted = run(main())
    error = error_of(refused, 429)
    assert refused.headers["retry-after"] == "1" and error["type"] == "RateLimitError"
    assert error["code"] == "queue_full"
    for status, frames in accepted:   # the admitted ones are served in full
        assert status == 200 and frames[-1] == "[DONE]"
        assert [c["finish_reason"] for f in frames[:-1] for c in f["choices"] if c["finish_reason"]] == ["length"]
    assert live.blocks_in_use() == 0


def test_prompt_beyond_max_model_len_is_400_naming_both_numbers(live):
    response = httpx.post(live.url + "/v1/completions", json=completion(prompt=[5] * 250, max_tokens=10))
    error = error_of(response, 400)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert "requested 260 tokens (250 in the prompt, 10 for the completion)" in error["message"]


def test_body_over_the_limit_is_413_with_or_without_content_length(live):
    big = orjson.dumps(completion(prompt=[5] * (BODY_LIMIT // 2)))
    json_type = {"content-type": "application/json"}
    whole = httpx.post(live.url + "/v1/completions", content=big, headers=json_type)
    assert error_of(whole, 413)["type"] == "RequestTooLargeError"

    def chunks():
        for i in range(0, len(big), 1024):
            yield big[i:i + 1024]
    chunked = httpx.post(live.url + "/v1/completions", content=chunks(), headers=json_type)
    assert error_of(chunked, 413)["code"] == "request_too_large"
    assert httpx.post(live.url + "/v1/completions", json=completion()).status_code == 200


# ---- deadlines ----------------------------------------------------------------------------

def test_deadline_header_aborts_the_request_with_408_and_frees_its_blocks(live):
    timeout = {"X-Request-Timeout": "0.5"}

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            live.gate.pause()   # nothing is computed: only the deadline can end these
            start = time.monotonic()
            plain, streamed = await asyncio.gather(
                client.post("/v1/completions", json=completion(max_tokens=50), headers=timeout),
                stream(client, "/v1/completions", completion(max_tokens=50), headers=timeout))
            elapsed = time.monotonic() - start
            live.gate.resume()
            return plain, streamed, elapsed

    plain, (status, frames), elapsed = run(main())
    assert 0.5 <= elapsed < 5
    error = error_of(plain, 408)
    assert error["type"] == "RequestTimeoutError" and error["code"] == "request_timeout"
    assert "deadline of 0.5 s" in error["message"]
    assert status == 200 and frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "request_timeout"
    # the aborts reach the engine thread through its inbox after the answers went out: a
    # loaded box may need a moment (bounded: an abort that never lands fails here)
    give_up = time.monotonic() + 10
    while live.engine.core.requests and time.monotonic() < give_up:
        time.sleep(0.02)
    assert live.blocks_in_use() == 0 and not live.engine.core.requests


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_malformed_deadline_header_is_400(live, value):
    response = httpx.post(live.url + "/v1/completions", json=completion(), headers={"X-Request-Timeout": value})
    assert error_of(response, 400)["code"] == "invalid_header"


def test_server_request_timeout_is_a_ceiling_the_header_can_only_lower():
    engine = FakeEngine(step_delay=0.05)
    client = TestClient(build_app(engine, Config(request_timeout=0.3)))
    start = time.monotonic()
    error = error_of(client.post("/v1/chat/completions", json=chat_body(max_tokens=40),
                                 headers={"X-Request-Timeout": "100"}), 408)
    assert 0.3 <= time.monotonic() - start < 3 and "deadline of 0.3 s" in error["message"]
    shorter = client.post("/v1/chat/completions", json=chat_body(max_tokens=40),
                          headers={"X-Request-Timeout": "0.1"})
    assert "deadline of 0.1 s" in error_of(shorter, 408)["message"]
    assert len(engine.closed_early) == 2   # both engine iterators were closed: aborted
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=3)).status_code == 200


# ---- fault isolation ----------------------------------------------------------------------

def _poison(live):
    core = live.engine.core
    advance = core._advance

    def poisoned(seq, token, logprob):
        if seq.prompt_token_ids[0] == POISON:
            raise ValueError("injected detokenizer failure")
        return advance(seq, token, logprob)
    core._advance = poisoned


async def _engine_request(engine, request: EngineRequest):
    """Submit on the engine's event loop; its refusal (raised synchronously) comes back here."""
    async def consume():
        engine.submit([request], _ListSink())
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(consume(), engine._loop))


class _ListSink:
    def __init__(self):
        self.items = []

    def deliver(self, out):
        self.items.append(out)

    def fail(self, request_id, error):
        self.items.append(error)


def test_a_poisoned_request_fails_alone_while_the_others_complete(live):
    _poison(live)
    bad_bias = EngineRequest("bad-bias", [5, 6], SamplingParams(max_tokens=4, logit_bias={10**7: 1.0}))

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/completions", json=completion(max_tokens=16)),
                client.post("/v1/completions", json=completion(prompt=[9, 10], max_tokens=16)),
                stream(client, "/v1/completions", completion(prompt=[11, 12], max_tokens=16)),
                client.post("/v1/completions", json=completion(prompt=[POISON, 1], max_tokens=16)),
                stream(client, "/v1/completions", completion(prompt=[POISON, 2], max_tokens=16)),
                client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "BOOM"}]}),
                _engine_request(live.engine, bad_bias), return_exceptions=True)

    try:
        good1, good2, (good_status, good_frames), bad, (bad_status, bad_frames), boom, bias = run(main())
    finally:
        del live.engine.core._advance
    for response in (good1, good2):
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16
    assert good_status == 200 and good_frames[-1] == "[DONE]" and "error" not in good_frames[-2]
    assert sum(len(c["text"]) > 0 for f in good_frames[:-1] for c in f["choices"]) > 0
    error = error_of(bad, 422)   # the request's own fault: no 5xx, and the server goes on
    assert error["code"] == "request_failed" and "injected detokenizer failure" not in error["message"]   # log only
    assert bad_status == 200 and bad_frames[-2]["error"]["code"] == "request_failed"
    assert "the template refuses BOOM" in error_of(boom, 400)["message"]
    assert isinstance(bias, RequestRejectedError) and bias.param == "logit_bias"
    assert live.engine.is_alive and live.blocks_in_use() == 0
    assert httpx.post(live.url + "/v1/completions", json=completion()).status_code == 200


def test_engine_crash_fails_in_flight_requests_fast_then_the_server_exits(tiny_llama_dir):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("gateway.engine").addHandler(handler)
    body = completion(max_tokens=200)

    async def main(live):
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            running = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(stream(client, "/v1/completions", body, first_token=e))
                       for e in running]
            plain = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
            await asyncio.gather(*(e.wait() for e in running))
            start = time.monotonic()
            live.gate.crash_in(1)
            results = await asyncio.gather(*streams, *plain)
            return results, time.monotonic() - start

    try:
        with _live(tiny_llama_dir, max_num_seqs=8) as live:
            results, elapsed = run(main(live))
            live.thread.join(20)   # the server stops by itself
            assert not live.thread.is_alive() and live.server.exit_code == EXIT_ENGINE_DEAD
    finally:
        logging.getLogger("gateway.engine").removeHandler(handler)
    assert elapsed < 5
    for status, frames in results[:3]:
        assert status == 200 and frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "engine_dead"
    for response in results[3:]:
        assert error_of(response, 503)["code"] == "engine_dead"
    crash = [r for r in records if r.getMessage().startswith("engine loop crashed")]
    assert crash and "InjectedCrash: injected engine crash" in crash[0].getMessage()

    async def probe():   # the app object outlives the server: what it would answer now
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=live.app), base_url="http://t") as client:
            return [await client.get("/health"), await client.get("/ready"),
                    await client.post("/v1/completions", json=completion())]
    health, ready, late = run(probe())
    assert health.status_code == 503 and ready.status_code == 503
    assert error_of(late, 503)["code"] == "engine_dead"


# ---- authentication and CORS, as the CLI configures them -------------------------------------

def _config(argv: list[str], environ: dict | None = None) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *argv]), environ or {})


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_from_flags_env_and_file_each_open_the_api(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("file-key-1\n\n  file-key-2  \n")
    config = _config(["--api-key", "flag-a", "--api-key", "flag-b", "--api-key-file", str(key_file)],
                     {"GATEWAY_API_KEY": "env-1,env-2"})
    keys = ["flag-a", "flag-b", "env-1", "env-2", "file-key-1", "file-key-2"]
    assert sorted(config.api_keys) == sorted(keys)
    client = TestClient(build_app(FakeEngine(), config, FakeMetrics()))
    for key in keys:
        assert client.get("/v1/models", headers=_bearer(key)).status_code == 200
        generated = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=_bearer(key))
        assert generated.status_code == 200
    for header in ({}, _bearer("wrong"), _bearer(""), _bearer("env-1x"), {"Authorization": "env-1"},
                   {"Authorization": "Basic env-1"}, _bearer("env-1,env-2")):
        error = error_of(client.post("/v1/completions", json={"prompt": "x"}, headers=header), 401)
        assert error == {"message": error["message"], "type": "AuthenticationError", "param": None,
                         "code": "invalid_api_key"}


@pytest.mark.parametrize("guard_metrics", [False, True])
def test_every_route_but_health_and_ready_needs_the_key(guard_metrics):
    config = _config(["--api-key", "k"] + (["--guard-metrics"] if guard_metrics else []))
    app = build_app(FakeEngine(), config, FakeMetrics())
    client = TestClient(app)
    open_paths = {"/health", "/ready"} | (set() if guard_metrics else {"/metrics"})
    # the chat page and its assets open without a key (the page asks for it; its API calls need it)
    open_paths |= {route.path for route in app.routes if route.path == "/" or route.path.startswith("/ui/")}
    checked = set()
    for route in app.routes:
        path = route.path.replace("{model:path}", "x")
        path = "/".join("x" if part.startswith("{") else part for part in path.split("/"))
        for method in sorted(set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
            response = client.request(method, path, json={})
            if route.path in open_paths:
                assert response.status_code != 401, (method, path)
            else:
                assert error_of(response, 401)["type"] == "AuthenticationError", (method, path)
            checked.add(route.path)
    assert {"/v1/chat/completions", "/v1/completions", "/metrics", "/openapi.json", "/tokenize"} <= checked


def test_cors_flags_shape_the_preflight():
    config = _config(["--api-key", "k", "--cors-origin", "https://ui.example", "--cors-allow-methods", "GET,POST",
                      "--cors-allow-headers", "authorization",
                      "--cors-allow-headers", "content-type,x-request-timeout", "--cors-allow-credentials"])
    assert config.cors_allow_methods == ["GET", "POST"] and config.cors_allow_credentials
    assert config.cors_allow_headers == ["authorization", "content-type", "x-request-timeout"]
    client = TestClient(build_app(FakeEngine(), config))

    def preflight(method="POST", headers="authorization, x-request-timeout", origin="https://ui.example"):
        return client.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})
    ok = preflight()
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert {m.strip() for m in ok.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
    assert preflight(method="DELETE").status_code == 400
    assert preflight(headers="x-evil").status_code == 400
    assert preflight(origin="https://evil.example").status_code == 400
    answer = client.post("/v1/chat/completions", json=chat_body(max_tokens=2),
                         headers={"Origin": "https://ui.example", **_bearer("k")})
    assert answer.status_code == 200 and answer.headers["access-control-allow-credentials"] == "true"


def test_cors_defaults_allow_any_method_and_header_without_credentials():
    client = TestClient(build_app(FakeEngine(), _config(["--cors-origin", "https://ui.example"])))
    ok = client.options("/v1/models", headers={"Origin": "https://ui.example",
                                               "Access-Control-Request-Method": "DELETE",
                                               "Access-Control-Request-Headers": "x-anything"})
    assert ok.status_code == 200 and "access-control-allow-credentials" not in ok.headers
