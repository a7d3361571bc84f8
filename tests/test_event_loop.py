"""The event loop only moves bytes (issue 21, parts 8-9): large bodies are tokenized off it and
every list a request carries is bounded; JSON routes need a JSON content type; refusals are
counted under their own finish reason; liveness turns false the moment a death is known; error
bodies carry no engine internals.

Fast checks go through the FakeEngine of test_api_app; the stall and the engine-death checks
run an in-process server (tests/live_server.py) over a tiny random-weight model with the
default model's tokenizer, so they exercise the real tokenizer, template and engine thread."""

import asyncio
import threading
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from gateway.api import protocol as P
from gateway.api.app import build_app
from gateway.api.tokenizing import Tokenizing
from gateway.config import Config
from gateway.engine.errors import EngineDeadError, QueueFullError
from gateway.executor.errors import ExecutorDeadError
from gateway.metrics import ServerMetrics
from live_server import LiveServer, run, stream
from test_api_app import FakeEngine, chat_body, make

STALL_LIMIT_S = 0.5   # what /health may take while a big body is tokenized (measured: ~0.05 s)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- bounds on every list ----------------------------------------------------------------

def _message(content="hi"):
    return {"role": "user", "content": content}


OVER_THE_BOUND = [   # (route, body fields, the param named, the limit named)
    ("/v1/chat/completions", {"messages": [_message()] * (P.MAX_MESSAGES + 1)}, "messages", P.MAX_MESSAGES),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]
                                            * (P.MAX_CONTENT_PARTS + 1)}]},
     "messages[0].content", P.MAX_CONTENT_PARTS),
    ("/v1/chat/completions", {"messages": [_message()], "stop_token_ids": [5] * (P.MAX_STOP_TOKEN_IDS + 1)},
     "stop_token_ids", P.MAX_STOP_TOKEN_IDS),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(P.MAX_LOGIT_BIAS + 1)}},
     "logit_bias", P.MAX_LOGIT_BIAS),
    ("/v1/completions", {"prompt": [[5]] * 100_000}, "prompt", P.MAX_CHOICES),
    ("/tokenize", {"messages": [_message()] * (P.MAX_MESSAGES + 1)}, "messages", P.MAX_MESSAGES),
]


@pytest.mark.parametrize("route, fields, param, limit", OVER_THE_BOUND, ids=lambda v: v if isinstance(v, str) else "")
def test_each_list_over_its_bound_is_a_400_naming_the_field_and_the_limit(route, fields, param, limit):
    engine, client = make()
    err = error_of(client.post(route, json={"max_tokens": 1, **fields} if route != "/tokenize" else fields), 400)
    assert err["param"] == param
    assert f"maximum length {limit}," in err["message"] or f"at most {limit} entries" in err["message"]
    assert err["code"] in ("array_above_max_length", "object_above_max_size")
    assert engine.submitted == []


def test_lists_at_their_bound_are_accepted():
    req = P.parse_completion({"prompt": "x", "max_tokens": 1, "stop_token_ids": [5] * P.MAX_STOP_TOKEN_IDS,
                              "logit_bias": {str(i): 1 for i in range(P.MAX_LOGIT_BIAS)}},
                             P.ModelInfo("m", vocab_size=49152, max_model_len=64))
    assert len(req.params.logit_bias) == P.MAX_LOGIT_BIAS
    engine, client = make()
    parts = [{"type": "text", "text": "a"}] * P.MAX_CONTENT_PARTS
    tokens = client.post("/tokenize", json={"messages": [_message(parts)] * 2}).json()
    assert tokens["count"] > 2 * P.MAX_CONTENT_PARTS


# ---- content type ------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonx", "json"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/sessions"])
def test_a_body_that_is_not_declared_json_is_415_and_nothing_is_generated(route, content_type):
    engine, client = make()
    body = orjson.dumps(chat_body(max_tokens=2) if "chat" in route else {"prompt": "hello", "max_tokens": 2})
    headers = {} if content_type is None else {"content-type": content_type}
    err = error_of(client.post(route, content=body, headers=headers), 415)
    assert err["type"] == "UnsupportedMediaTypeError" and err["code"] == "unsupported_media_type"
    assert engine.submitted == []


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_accepted(content_type):
    engine, client = make()
    response = client.post("/v1/chat/completions", content=orjson.dumps(chat_body(max_tokens=2)),
                           headers={"content-type": content_type})
    assert response.status_code == 200 and len(engine.submitted) == 1


# ---- metrics -----------------------------------------------------------------------------

def _success_counts(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    return {s.labels["finished_reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "gateway:request_success_total"}


@pytest.mark.parametrize("stream_", [False, True])
def test_a_429_is_counted_as_rejected_not_as_error_or_abort(stream_):
    metrics = ServerMetrics("fake-model")
    _, client = make(FakeEngine(refuse=QueueFullError("queue full")), metrics)
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=chat_body(stream=stream_, n=2)).status_code == 429
    counts = _success_counts(metrics)
    assert counts["rejected"] == 6 and counts["error"] == 0 and counts["abort"] == 0, counts
    latencies = [s.value for f in text_string_to_metric_families(metrics.render()[0].decode()) for s in f.samples
                 if s.name == "gateway:e2e_request_latency_seconds_count"]
    assert latencies == [0]   # a refusal is no request latency


def test_an_engine_failure_is_still_an_error():
    metrics = ServerMetrics("fake-model")
    _, client = make(FakeEngine(fail_after=1), metrics)
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=4)).status_code == 503
    counts = _success_counts(metrics)
    assert counts["error"] == 1 and counts["rejected"] == 0, counts


# ---- no internals in error bodies --------------------------------------------------------

class _LeakyTemplate(FakeEngine):
    def encode_chat(self, messages):
        raise KeyError("secret internal detail")


def test_error_bodies_name_no_exception_class_and_no_pid():
    dead = EngineDeadError("tensor-parallel rank 1 (pid 4242) died (exit code -9)")
    cases = [(FakeEngine(refuse=RuntimeError("boom at 0xdeadbeef")), 500),
             (FakeEngine(refuse=dead), 503), (_LeakyTemplate(), 400)]
    for engine, status in cases:
        _, client = make(engine)
        for stream_ in (False, True):
            err = error_of(client.post("/v1/chat/completions", json=chat_body(stream=stream_)), status)
            for leak in ("RuntimeError", "EngineDeadError", "KeyError", "boom", "4242", "pid", "secret", "0x"):
                assert leak not in err["message"], err
    frames = make(FakeEngine(fail_after=1))[1].post("/v1/chat/completions", json=chat_body(stream=True)).text
    assert "engine_dead" in frames and "engine died" not in frames


# ---- the tokenizing thread ---------------------------------------------------------------

class _ThreadRecorder(FakeEngine):
    def __init__(self):
        super().__init__()
        self.threads = []

    def encode(self, text, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        return super().encode(text, add_special_tokens)


def test_small_inputs_are_tokenized_inline_large_ones_on_one_thread():
    engine = _ThreadRecorder()
    tokenizing = Tokenizing(engine, inline_chars=100)

    async def main():
        await tokenizing.encode("short")
        await asyncio.gather(*(tokenizing.encode("x" * 1000) for _ in range(4)))
        return threading.current_thread().name
    loop_thread = asyncio.run(main())
    tokenizing.close()
    assert engine.threads[0] == loop_thread
    assert len(set(engine.threads[1:])) == 1 and engine.threads[1].startswith("gateway-tokenize")


# ---- against the real tokenizer and engine thread ------------------------------------------

@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256,
                    max_request_bytes=8 * 2**20) as server:
        yield server


def _worst_health_while(url: str, work) -> tuple[object, float, float]:
    """(work's result, the slowest /health answer while it ran, how long it ran)."""
    done, worst = threading.Event(), [0.0]

    def probe():
        with httpx.Client(base_url=url, timeout=60) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                worst[0] = max(worst[0], time.monotonic() - start)
                time.sleep(0.02)
    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)
    start = time.monotonic()
    try:
        result = work()
    finally:
        elapsed = time.monotonic() - start
        done.set()
        prober.join(60)
    return result, worst[0], elapsed


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [_message("hello world " * 290_000)]}),   # 3.5 MB, one message
    ("/v1/completions", {"prompt": "hello world " * 290_000}),
    ("/v1/chat/completions", {"messages": [_message("")] * 120_000}),               # 3.5 MB of messages
], ids=["one-big-message", "big-prompt", "120k-messages"])
def test_a_big_body_does_not_stall_health(live, route, body):
    raw = orjson.dumps({**body, "max_tokens": 1})
    assert len(raw) > 3_000_000
    response, worst, elapsed = _worst_health_while(live.url, lambda: httpx.post(
        live.url + route, content=raw, headers={"content-type": "application/json"}, timeout=120))
    print(f"{route} {len(raw) / 1e6:.1f} MB: answered in {elapsed:.2f} s; slowest /health {worst * 1000:.0f} ms")
    assert response.status_code == 400   # too long for the context, or too many messages
    assert worst < STALL_LIMIT_S
    assert httpx.post(live.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200


def test_health_and_ready_fail_the_moment_the_executor_is_declared_dead(tiny_llama_dir):
    """As when a tensor-parallel worker dies: the executor's monitor thread declares it, and
    the loop (here held inside a step) has not noticed yet."""
    def declared_dead():
        raise ExecutorDeadError("tensor-parallel rank 1 (pid 4242) died (exit code -9)")

    async def main(live):
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            live.gate.pause()
            opened = asyncio.Event()
            running = asyncio.create_task(stream(client, "/v1/completions", {
                "prompt": [5, 6], "max_tokens": 50, "ignore_eos": True}, opened))
            await opened.wait()
            while not live.engine.core.requests:   # added: the loop is now held inside the step
                await asyncio.sleep(0.01)
            # The server's 0.1 s tick exits (code 3) once it sees the death; on a starved box that
            # tick can come before the two GETs below. This test reads the answers in between, so
            # the tick is told the death is already handled (the exit has tests of its own).
            live.server.engine_died = True
            live.engine.core.runner.check_health = declared_dead
            answers = [await client.get("/health"), await client.get("/ready"),
                       await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})]
            live.gate.resume()   # the loop now meets the death itself and fails what is in flight
            return answers, await running

    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256) as live:
        (health, ready, refused), (status, frames) = run(main(live))
        live.server.should_exit = True
        live.thread.join(20)
    assert health.status_code == 503 and ready.status_code == 503
    assert error_of(refused, 503)["code"] == "engine_dead"
    assert status == 200 and frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "engine_dead"
    for message in (refused.json()["error"]["message"], frames[-2]["error"]["message"]):
        assert "4242" not in message and "ExecutorDeadError" not in message and "pid" not in message
