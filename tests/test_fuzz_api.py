"""API fuzzing: hostile and random input never gets a 5xx, and the server still serves after.

Three layers, each ending with a valid request that must succeed:
1. schemathesis over /openapi.json (positive and negative cases for every operation), in
   process through the ASGI app over test_api_app's FakeEngine; every answer is documented
   in the document and every error is an OpenAI error object; then the same generated cases
   over HTTP against the live server of layer 3, whose engine is real;
2. hypothesis: arbitrary bytes and arbitrary JSON values as the body of every POST route;
3. hypothesis: plausible-but-nasty generation bodies (sampling edge values, out-of-vocabulary
   ids, odd stops, n, logprobs, deadline headers) against a live server over a tiny
   random-weight model, so they reach the real tokenizer, scheduler and sampler; the KV
   cache must be empty at the end.
Plus: /openapi.json describes every route the app serves."""

import json
import os
import re
from collections import Counter

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gateway.api.app import build_app
from gateway.config import Config
from live_server import LiveServer
from test_api_app import FakeEngine, chat_body

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# The long run (issue 21's note), against the default model instead of the tiny one:
#   GATEWAY_FUZZ_EXAMPLES=5000 GATEWAY_FUZZ_MODEL=default python -m pytest -q -s tests/test_fuzz_api.py -k "live or real"
# (the body layer draws that many; the live schemathesis layer a hundredth of it per operation, which
# its coverage phase multiplies into ~1,400 calls at 10)
LIVE_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "50"))
# A request without max_tokens may generate up to the live server's 128-token context, n times,
# on a loaded 2-core box: minutes are possible, a hang is not.
LIVE_TIMEOUT_S = 300
LIVE_DEFAULT_MODEL = os.environ.get("GATEWAY_FUZZ_MODEL") == "default"
LIVE_STATUSES: Counter = Counter()
PROGRESS_EVERY = 250   # a long run (-s) prints its counts as it goes, so a stopped run still has figures


def count_status(status: int) -> None:
    LIVE_STATUSES[status] += 1
    if sum(LIVE_STATUSES.values()) % PROGRESS_EVERY == 0:
        print(f"live fuzz so far: {sum(LIVE_STATUSES.values())} requests, statuses {dict(sorted(LIVE_STATUSES.items()))}",
              flush=True)
ERROR_KEYS = {"message", "type", "param", "code"}
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/tokenize",
               "/detokenize"]

APP = build_app(FakeEngine(), Config(max_request_bytes=64 * 1024))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)


def check_answer(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, body[:500]
    if status >= 400 and content_type.startswith("application/json"):
        error = orjson.loads(body)["error"]
        assert set(error) == ERROR_KEYS and error["message"]


def check_stream(body: bytes) -> None:
    """A 200 stream ends with [DONE] (a Responses stream: with response.completed or
    .incomplete); an error frame, if any, is a client error."""
    if body.startswith(b"event: "):
        events = [orjson.loads(part.split(b"data: ", 1)[1]) for part in body.split(b"\n\n") if b"data: " in part]
        assert events[-1]["type"] in ("response.completed", "response.incomplete", "error"), body[-300:]
        assert events[-1].get("code") not in ("engine_dead", "engine_abort"), events[-1]
        return
    frames = [line[len(b"data: "):] for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    assert frames and frames[-1] == b"[DONE]", body[-300:]
    for frame in frames[:-1]:
        obj = orjson.loads(frame)
        if "error" in obj:
            assert obj["error"]["type"] not in ("InternalServerError", "ServiceUnavailableError"), obj


def schemathesis_content_type(response) -> str:
    return (response.headers.get("content-type") or [""])[0]   # schemathesis: name → values


@SCHEMA.parametrize()
@settings(max_examples=20, **SETTINGS)
def test_schemathesis_cases_never_get_a_server_error(case):
    response = case.call()
    content_type = schemathesis_content_type(response)
    check_answer(response.status_code, response.content, content_type)
    documented = case.operation.definition.raw["responses"]
    assert str(response.status_code) in documented or response.status_code == 405, response.status_code
    if content_type.startswith("text/event-stream"):
        check_stream(response.content)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["model", "messages", "prompt", "max_tokens", "n", "stream", "stop", "logit_bias",
                               "logprobs", "top_logprobs", "temperature", "seed", "tokens", "stream_options",
                               "echo", "best_of", "suffix", "tools", "min_tokens", "add_special_tokens"])
to_json = lambda value: json.dumps(value).encode()   # noqa: E731 (orjson refuses ints beyond 64 bits)
bodies = (st.binary(max_size=200) | json_values.map(to_json)
          | st.dictionaries(field_names, json_values, max_size=6).map(to_json))


@settings(max_examples=120, **SETTINGS)
@given(route=st.sampled_from(POST_ROUTES), body=bodies)
def test_arbitrary_bodies_never_get_a_server_error(route, body):
    client = TestClient(APP)
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    check_answer(response.status_code, response.content, response.headers.get("content-type", ""))
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        check_stream(response.content)


def test_openapi_describes_every_route_and_method():
    documented = TestClient(APP).get("/openapi.json").json()["paths"]
    for route in APP.routes:
        if route.path == "/" or route.path.startswith("/ui/"):
            continue   # the built-in chat page and its assets (api/web_ui.py) are not API
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        assert path in documented, f"{route.path} is served but not in /openapi.json"
        methods = {m.lower() for m in getattr(route, "methods", None) or ()} - {"head"}
        assert methods <= set(documented[path]), (route.path, methods)


def test_the_fake_server_still_serves_after_the_fuzzing():
    assert TestClient(APP).post("/v1/chat/completions", json=chat_body(max_tokens=3)).status_code == 200


# ---- against a real (tiny) engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with LiveServer(model=None if LIVE_DEFAULT_MODEL else str(tiny_llama_dir), num_kv_blocks=48, block_size=16, max_model_len=128,
                    max_num_seqs=8) as server:
        yield server


@pytest.fixture(scope="module")
def live_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


LIVE_SCHEMA = schemathesis.pytest.from_fixture("live_schema")


@LIVE_SCHEMA.parametrize()
@settings(max_examples=max(10, LIVE_EXAMPLES // 100), **SETTINGS)
def test_schemathesis_cases_never_get_a_server_error_from_the_live_server(case):
    response = case.call(timeout=LIVE_TIMEOUT_S)
    count_status(response.status_code)
    content_type = schemathesis_content_type(response)
    check_answer(response.status_code, response.content, content_type)
    if response.status_code == 200 and content_type.startswith("text/event-stream"):
        check_stream(response.content)


def _floats(lo: float, hi: float):
    return st.floats(lo, hi) | st.sampled_from([0.0, -0.0, 1e-30, lo, hi])


def _requests(ids, text, floats, ints, names) -> st.SearchStrategy:
    """(route, body) with fields drawn from the given value strategies."""
    sampling = {
        "temperature": floats(0, 2), "top_p": floats(1e-6, 1), "top_k": ints(-1, 60000), "min_p": floats(0, 1),
        "presence_penalty": floats(-2, 2), "frequency_penalty": floats(-2, 2),
        "repetition_penalty": floats(1e-3, 2), "seed": ints(-2**63, 2**63 - 200), "min_tokens": ints(0, 4),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "n": ints(1, 3),
        "stream": st.booleans(), "max_tokens": ints(1, 8),
        "logit_bias": st.dictionaries(names, floats(-100, 100), max_size=3),
        "stop": text(1, 3) | st.lists(text(1, 3), max_size=3), "stop_token_ids": st.lists(ids, max_size=3),
    }
    chat = {**sampling, "logprobs": st.booleans(), "top_logprobs": ints(0, 20)}
    completion = {**sampling, "logprobs": ints(0, 20), "echo": st.booleans()}
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text(0, 10)})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                     "content": text(0, 30) | st.lists(part, min_size=1, max_size=2)})
    prompt = text(1, 40) | st.lists(ids, min_size=1, max_size=20) | st.lists(
        text(1, 10) | st.lists(ids, min_size=1, max_size=5), min_size=1, max_size=3)
    return st.one_of(
        st.tuples(st.just("/v1/chat/completions"),
                  st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}, optional=chat)),
        st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": prompt}, optional=completion)))


def _nasty_ints(lo: int, hi: int):
    return st.integers(lo - 2, hi + 2) | st.sampled_from([-2**64, 2**64])


# Mostly in range, so that requests reach the engine; a third anywhere near or past the edges.
plausible = _requests(st.integers(0, 49151), lambda lo, hi: st.text(min_size=lo, max_size=hi), _floats,
                      st.integers, st.integers(0, 49151).map(str))
EXTREMES = st.sampled_from([1e-46, -1e-46, 1e39, -1e39, 1e300, -1e300, 2.0**31, -(2.0**63)])
nasty = _requests(st.integers(-3, 70000), lambda lo, hi: st.text(max_size=hi),
                  lambda lo, hi: _floats(lo - 1, hi + 1) | EXTREMES, _nasty_ints,
                  st.integers(-3, 70000).map(str) | st.text(max_size=3))
requests = plausible | plausible | nasty
deadlines = st.none() | st.none() | st.sampled_from(["0.001", "0.05", "30", "x", "-1", "1e400"])


@settings(max_examples=LIVE_EXAMPLES, **SETTINGS)
@given(request=requests, deadline=deadlines)
def test_nasty_generation_bodies_never_get_a_server_error_from_the_real_engine(live, request, deadline):
    route, body = request
    headers = {} if deadline is None else {"X-Request-Timeout": deadline}
    response = httpx.post(live.url + route, json=body, headers=headers, timeout=LIVE_TIMEOUT_S)
    count_status(response.status_code)
    check_answer(response.status_code, response.content, response.headers.get("content-type", ""))
    if response.status_code == 200 and body.get("stream") is True:
        check_stream(response.content)


def test_the_real_server_still_serves_after_the_fuzzing_with_an_empty_kv_cache(live):
    body = {"prompt": [5, 6], "max_tokens": 3, "ignore_eos": True}
    response = httpx.post(live.url + "/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert live.engine.is_alive and live.blocks_in_use() == 0
    print(f"\nlive fuzz: {sum(LIVE_STATUSES.values())} requests, statuses {dict(sorted(LIVE_STATUSES.items()))}")
