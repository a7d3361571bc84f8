"""The HTTP app (gateway/api/app.py and friends) over a FakeEngine with the AsyncEngine
interface: byte-level tokens, and generation that emits "a", "b", "c"... shifted by the seed,
so every shape and every number below is exact. Disconnects are driven at the ASGI level,
because test clients buffer whole responses and never hang up mid-stream."""

import asyncio
import json
import time

import orjson
import pytest
from starlette.testclient import TestClient

from gateway.api import protocol as P
from gateway.api.app import build_app
from gateway.api.openapi import build_openapi
from gateway.config import Config
from gateway.engine.client import EngineClient
from gateway.engine.errors import EngineDeadError, QueueFullError, check_context_length
from gateway.engine.messages import RequestOutput, StepStats, TokenLogprob

MSG = [{"role": "user", "content": "hi"}]


class FakeTokenizer:
    def __len__(self) -> int:
        return 256


class FakeEngine:
    """An EngineClient: submit() checks and refuses like AsyncEngine (synchronously, all
    choices or none), then one task per request delivers its outputs to the sink."""
    model_name = "fake-model"
    max_model_len = 64
    embedding_size = 8

    def __init__(self, refuse=None, fail_after=None, step_delay=0.0, ready=True):
        self.tokenizer = FakeTokenizer()
        self.refuse, self.fail_after, self.step_delay = refuse, fail_after, step_delay
        self.alive, self.ready, self.draining = True, ready, False
        self.submitted, self.closed_early, self.aborted, self.active = [], [], [], set()
        self.tasks = {}
        self.started = self.stopped = False

    async def start(self):
        self.started = True

    async def shutdown(self):
        self.stopped = True

    def encode_chat(self, messages, add_generation_prompt=True):
        if any(m["content"] == "BAD" for m in messages):
            raise ValueError("Conversation roles must alternate")
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, token_ids):
        return bytes(token_ids).decode("utf-8", errors="replace")

    def token_str(self, token_id):
        return self.decode([token_id])

    @property
    def is_alive(self):
        return self.alive

    def is_ready(self):
        return self.ready

    def stats(self):
        return StepStats()

    def num_kv_blocks_in_use(self):
        return len(self.active)

    def worker_pids(self):
        return []

    def pin_prefix(self, key, token_ids):
        return _resolved(0)

    def unpin_prefix(self, key):
        return _resolved(0)

    def fail_in_flight(self, make_error):
        return 0

    def submit(self, requests, sink):
        if self.refuse is not None:
            raise self.refuse
        for request in requests:   # the engine's one context check, as EngineCore.check_request does it
            check_context_length(self.max_model_len, len(request.prompt_token_ids), request.params.max_tokens)
        for request in requests:
            self.submitted.append(request)
            self.active.add(request.request_id)
            self.tasks[request.request_id] = asyncio.get_running_loop().create_task(self._run(request, sink))

    def abort(self, request_id):
        self.aborted.append(request_id)
        task = self.tasks.pop(request_id, None)
        if task is not None and request_id in self.active:
            self.active.discard(request_id)
            self.closed_early.append(request_id)
            task.cancel()

    async def _run(self, request, sink):
        p, scheduled = request.params, time.monotonic()
        if request.pooling is not None:   # an embedding: one output, a unit vector from the prompt
            await asyncio.sleep(self.step_delay)
            self.active.discard(request.request_id)
            self.tasks.pop(request.request_id, None)
            raw = [float(sum(request.prompt_token_ids[i::self.embedding_size]) + 1) for i in range(self.embedding_size)]
            norm = sum(v * v for v in raw) ** 0.5
            sink.deliver(RequestOutput(request.request_id, [], "", finished=True, finish_reason="stop",
                                       num_prompt_tokens=len(request.prompt_token_ids),
                                       embedding=[v / norm for v in raw]))
            return
        try:
            for i in range(p.max_tokens):
                await asyncio.sleep(self.step_delay)
                if i == self.fail_after:
                    raise EngineDeadError("engine died")
                token = ord("a") + ((p.seed or 0) + i) % 26
                last = i == p.max_tokens - 1
                top = [(token, -0.5), (ord("z"), -3.0)][:p.logprobs or 0]
                lp = None if p.logprobs is None else [TokenLogprob(token, -0.5, top)]
                if last:
                    self.active.discard(request.request_id)
                    self.tasks.pop(request.request_id, None)
                sink.deliver(RequestOutput(request.request_id, [token], chr(token), lp, finished=last,
                                           finish_reason="length" if last else None,
                                           num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=i + 1,
                                           first_scheduled_time=scheduled))
        except EngineDeadError as exc:
            self.active.discard(request.request_id)
            self.tasks.pop(request.request_id, None)
            sink.fail(request.request_id, exc)


def _resolved(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class FakeMetrics:
    def __init__(self):
        self.records = []

    def on_request_finished(self, record):
        self.records.append(record)

    def render(self):
        return b"gateway:requests 1\n", "text/plain; version=0.0.4; charset=utf-8"


def make(engine=None, metrics=None, **config):
    engine = engine or FakeEngine()
    return engine, TestClient(build_app(engine, Config(**config), metrics))


def sse(text: str) -> list:
    frames = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert frames[-1] == "[DONE]", frames[-3:]
    return [json.loads(f) for f in frames[:-1]]


def chat_body(**fields):
    return {"model": "fake-model", "messages": MSG, **fields}


PROMPT_LEN = len("<user>hi<assistant>")


# ---- chat -------------------------------------------------------------------------------

def test_chat_response_has_the_openai_shape():
    engine, client = make()
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=4)).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "abcd"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": PROMPT_LEN, "completion_tokens": 4, "total_tokens": PROMPT_LEN + 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert engine.submitted[0].request_id == body["id"] + "-0"
    assert engine.submitted[0].prompt_token_ids == engine.encode("<user>hi<assistant>")


def test_chat_default_max_tokens_is_the_rest_of_the_context():
    engine, client = make()
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert engine.submitted[0].params.max_tokens == FakeEngine.max_model_len - PROMPT_LEN


def test_chat_stream_deltas_concatenate_to_the_non_streamed_text():
    _, client = make()
    text = client.post("/v1/chat/completions", json=chat_body(max_tokens=5)).json()["choices"][0]["message"]["content"]
    response = client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse(response.text)
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text == "abcde"
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert len({c["id"] for c in chunks}) == 1


def test_include_usage_adds_a_usage_chunk_with_no_choices():
    _, client = make()
    chunks = sse(client.post("/v1/chat/completions", json=chat_body(
        max_tokens=3, n=2, stream=True, stream_options={"include_usage": True})).text)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": PROMPT_LEN, "completion_tokens": 6,
                                   "total_tokens": PROMPT_LEN + 6, "prompt_tokens_details": {"cached_tokens": 0}}


def test_n_fans_out_with_seed_plus_index():
    engine, client = make()
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=3, n=2, seed=7)).json()
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "hij"), (1, "ijk")]
    assert [r.request_id for r in engine.submitted] == [body["id"] + "-0", body["id"] + "-1"]
    assert [r.params.seed for r in engine.submitted] == [7, 8]
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == PROMPT_LEN


def test_streamed_n_2_ends_each_choice_once():
    _, client = make()
    chunks = sse(client.post("/v1/chat/completions", json=chat_body(max_tokens=3, n=2, stream=True)).text)
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    for i in (0, 1):
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"][0]["index"] == i) == "abc"


def test_chat_logprobs_shape():
    _, client = make()
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=2, logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]}, {"token": "z", "logprob": -3.0, "bytes": [122]}]}
    assert [e["token"] for e in content] == ["a", "b"]


def test_streamed_chat_logprobs_ride_on_their_delta():
    _, client = make()
    chunks = sse(client.post("/v1/chat/completions", json=chat_body(max_tokens=2, logprobs=True, stream=True)).text)
    tokens = [e["token"] for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert tokens == ["a", "b"]


# ---- completions ------------------------------------------------------------------------

def test_completion_with_echo_and_token_prompt():
    engine, client = make()
    body = client.post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 2, "echo": True}).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hiab", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert engine.submitted[0].prompt_token_ids == [72, 105]


def test_completion_logprobs_shape():
    _, client = make()
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp == {"tokens": ["a", "b", "c"], "token_logprobs": [-0.5] * 3,
                  "top_logprobs": [{"a": -0.5}, {"b": -0.5}, {"c": -0.5}], "text_offset": [0, 1, 2]}


def test_several_prompts_times_n_give_indexed_choices_and_summed_usage():
    engine, client = make()
    body = client.post("/v1/completions", json={"prompt": ["ab", "cde"], "n": 2, "max_tokens": 1, "seed": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [r.prompt_token_ids for r in engine.submitted] == [[97, 98], [97, 98], [99, 100, 101], [99, 100, 101]]
    assert [r.params.seed for r in engine.submitted] == [1, 2, 1, 2]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 4


def test_streamed_completion_echoes_first_and_matches_non_streamed():
    _, client = make()
    full = client.post("/v1/completions", json={"prompt": "Q:", "max_tokens": 3, "echo": True}).json()
    chunks = sse(client.post("/v1/completions", json={"prompt": "Q:", "max_tokens": 3, "echo": True,
                                                       "stream": True}).text)
    assert chunks[0]["choices"][0]["text"] == "Q:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"] == "Q:abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---- errors -----------------------------------------------------------------------------

def error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    return err


def test_malformed_json_and_non_object_bodies_are_400():
    _, client = make()
    json_type = {"content-type": "application/json"}
    error(client.post("/v1/chat/completions", content=b"{nope", headers=json_type), 400)
    error(client.post("/v1/chat/completions", content=b"[1]", headers=json_type), 400)


def test_schema_violation_is_400_with_param():
    _, client = make()
    error(client.post("/v1/chat/completions", json=chat_body(temperature=-1)), 400, "temperature")
    error(client.post("/v1/chat/completions", json=chat_body(tools=[{}])), 400, "tools[0]")


def test_unknown_model_is_404():
    _, client = make()
    err = error(client.post("/v1/chat/completions", json=chat_body(model="gpt-4")), 404, "model")
    assert (err["type"], err["code"]) == ("NotFoundError", "model_not_found")


def test_context_overflow_is_400_giving_both_numbers_before_submission():
    engine, client = make()
    err = error(client.post("/v1/chat/completions", json=chat_body(max_tokens=50)), 400, "max_tokens")
    assert f"{PROMPT_LEN} in the prompt" in err["message"] and "50 for the completion" in err["message"]
    assert "64" in err["message"] and engine.submitted == []


def test_chat_template_failure_is_400_not_500():
    _, client = make()
    error(client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "BAD"}])),
          400, "messages")


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(stream):
    _, client = make(FakeEngine(refuse=QueueFullError("queue full")))
    response = client.post("/v1/chat/completions", json=chat_body(stream=stream))
    error(response, 429)
    assert response.headers["retry-after"] == "1"


def test_dead_engine_is_503_and_health_fails():
    engine, client = make()
    engine.alive = False
    error(client.post("/v1/chat/completions", json=chat_body()), 503)
    assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503


def test_engine_dead_during_generation_is_503_non_streamed():
    _, client = make(FakeEngine(refuse=EngineDeadError("gone")))
    error(client.post("/v1/completions", json={"prompt": "x"}), 503)


def test_error_after_the_stream_started_is_a_frame_then_done():
    _, client = make(FakeEngine(fail_after=2))
    chunks = sse(client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True)).text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "ab"
    assert chunks[-1]["error"]["type"] == "ServiceUnavailableError"


def test_internal_bug_is_500_and_the_server_keeps_serving():
    engine, client = make(FakeEngine(refuse=RuntimeError("boom")))
    err = error(client.post("/v1/chat/completions", json=chat_body()), 500)
    assert err["type"] == "InternalServerError" and "boom" not in err["message"]
    engine.refuse = None
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200


def test_unknown_route_and_wrong_method_are_error_objects():
    _, client = make()
    error(client.get("/v1/nothing"), 404)
    error(client.get("/v1/chat/completions"), 405)


# ---- middleware -------------------------------------------------------------------------

def test_api_keys_guard_everything_but_health_and_ready():
    _, client = make(metrics=FakeMetrics(), api_keys=["k1", "k2"])
    err = error(client.get("/v1/models"), 401)
    assert err["type"] == "AuthenticationError"
    error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    error(client.get("/v1/models", headers={"Authorization": "Basic k2"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_guard_metrics_puts_metrics_behind_the_key():
    _, client = make(metrics=FakeMetrics(), api_keys=["k"], guard_metrics=True)
    error(client.get("/metrics"), 401)
    assert client.get("/metrics", headers={"Authorization": "Bearer k"}).text == "gateway:requests 1\n"


def test_body_over_the_limit_is_413_by_content_length():
    engine, client = make(max_request_bytes=100)
    error(client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "x" * 200}])), 413)
    assert engine.submitted == []


def run_asgi(app, messages, on_send=None, disconnect=None, headers=((b"content-type", b"application/json"),),
             send_delay=0.0):
    """Drive one HTTP request through `app`; receive() yields `messages`, then waits for
    `disconnect` (an asyncio.Event) before reporting http.disconnect."""
    sent = []

    async def main():
        queue = list(messages)

        async def receive():
            if queue:
                return queue.pop(0)
            if disconnect is not None:
                await disconnect.wait()
            else:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if on_send:
                on_send(message, sent)
            if send_delay:   # a slow client: every write takes this long
                await asyncio.sleep(send_delay)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
                 "query_string": b"", "root_path": "", "headers": list(headers),
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    return sent


def test_chunked_body_over_the_limit_is_413_without_content_length():
    engine = FakeEngine()
    app = build_app(engine, Config(max_request_bytes=100), None)
    chunk = b'{"messages": [{"role": "user", "content": "' + b"x" * 60
    sent = run_asgi(app, [{"type": "http.request", "body": chunk, "more_body": True},
                          {"type": "http.request", "body": chunk, "more_body": True}])
    assert sent[0]["status"] == 413 and orjson.loads(sent[1]["body"])["error"]["type"] == "RequestTooLargeError"
    assert engine.submitted == []


def test_cors_preflight_needs_no_key_and_answers_with_the_origin():
    _, client = make(api_keys=["k"], cors_origins=["https://ui.example"])
    response = client.options("/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://ui.example"
    denied = client.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://ui.example"


# ---- disconnects and metrics ------------------------------------------------------------

def _body(**fields) -> list:
    return [{"type": "http.request", "body": orjson.dumps(chat_body(**fields)), "more_body": False}]


def test_a_slow_client_gets_the_pending_tokens_coalesced_into_one_event():
    engine = FakeEngine(step_delay=0.001)
    sent = run_asgi(build_app(engine, Config(), None), _body(max_tokens=40, stream=True, logprobs=True),
                    send_delay=0.05)
    chunks = sse(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode())
    content = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    letters = "".join(chr(ord("a") + i % 26) for i in range(40))
    assert "".join(c["delta"]["content"] for c in content) == letters
    assert len(content) <= 20   # one event per token would be 40
    for c in content:   # a coalesced delta's logprobs list every one of its tokens, in order
        assert "".join(e["token"] for e in c["logprobs"]["content"]) == c["delta"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_fake_and_the_real_engine_declare_the_engine_client_interface():
    from gateway.engine.async_engine import AsyncEngine
    assert isinstance(FakeEngine(), EngineClient)
    members = [m for m in dir(EngineClient) if not m.startswith("_")] + list(EngineClient.__annotations__)
    assert {"submit", "abort", "encode_chat", "draining"} <= set(members)
    source = __import__("inspect").getsource(AsyncEngine)
    assert all(hasattr(AsyncEngine, m) or f"self.{m} =" in source for m in members)


def test_stream_disconnect_closes_the_engine_iterator_and_records_an_abort():
    engine, metrics = FakeEngine(step_delay=0.005), FakeMetrics()
    app = build_app(engine, Config(), metrics)
    gone = _LoopFreeEvent()

    def on_send(message, sent):
        if sum(m["type"] == "http.response.body" for m in sent) == 3:
            gone.set()   # the client hangs up after the role chunk and two tokens

    sent = run_asgi(app, _body(max_tokens=40, stream=True), on_send, gone)
    request_id = engine.submitted[0].request_id
    assert engine.closed_early == [request_id] and engine.active == set()
    assert len([m for m in sent if m["type"] == "http.response.body"]) < 10
    assert [r.finish_reason for r in metrics.records] == ["abort"]
    assert 2 <= metrics.records[0].num_generation_tokens < 40


def test_non_streamed_disconnect_aborts_the_engine_request():
    engine, metrics = FakeEngine(step_delay=0.005), FakeMetrics()
    app = build_app(engine, Config(), metrics)
    gone = _LoopFreeEvent(set_after=0.05)
    sent = run_asgi(app, _body(max_tokens=40, n=2), None, gone)
    assert sorted(engine.closed_early) == sorted(r.request_id for r in engine.submitted)
    assert engine.active == set() and sent[0]["status"] == 499
    assert [r.finish_reason for r in metrics.records] == ["abort", "abort"]


class _LoopFreeEvent:
    """An event usable before the test's event loop exists; optionally sets itself after a delay."""

    def __init__(self, set_after=None):
        self._flag, self.set_after = False, set_after

    def set(self):
        self._flag = True

    async def wait(self):
        if self.set_after is not None:
            await asyncio.sleep(self.set_after)
            return
        while not self._flag:
            await asyncio.sleep(0.001)


def test_finished_requests_are_recorded_once_per_choice():
    metrics = FakeMetrics()
    _, client = make(metrics=metrics)
    client.post("/v1/chat/completions", json=chat_body(max_tokens=3, n=2))
    records = metrics.records
    assert [(r.finish_reason, r.num_generation_tokens, r.n, r.max_tokens) for r in records] == [("length", 3, 2, 3)] * 2
    assert all(len(r.token_times) == 3 and r.num_prompt_tokens == PROMPT_LEN for r in records)
    client.post("/v1/chat/completions", json=chat_body())
    assert metrics.records[-1].max_tokens is None   # left to the context, as vLLM records it
    assert all(r.arrival_time <= r.first_scheduled_time <= r.token_times[0] <= r.finish_time for r in records)


# ---- other routes -----------------------------------------------------------------------

def test_models_version_health_ready_and_metrics():
    engine, client = make(metrics=FakeMetrics())
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 64
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    error(client.get("/v1/models/other"), 404, "model")
    assert client.get("/version").json()["version"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": "fake-model", "kv_blocks_in_use": 0,
                                           "worker_pids": []}
    engine.ready = False
    assert client.get("/ready").status_code == 503
    metrics = client.get("/metrics")
    assert metrics.text == "gateway:requests 1\n" and metrics.headers["content-type"].startswith("text/plain")


def test_metrics_route_is_404_without_metrics():
    _, client = make()
    error(client.get("/metrics"), 404)


def test_tokenize_and_detokenize_round_trip():
    _, client = make()
    tok = client.post("/tokenize", json={"prompt": "hey"}).json()
    assert tok == {"tokens": [104, 101, 121], "count": 3, "max_model_len": 64}
    chat = client.post("/tokenize", json={"messages": MSG}).json()
    assert chat["count"] == PROMPT_LEN
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hey"}


def test_tokenize_and_detokenize_errors():
    _, client = make()
    error(client.post("/tokenize", json={}), 400, "prompt")
    error(client.post("/tokenize", json={"prompt": "a", "messages": MSG}), 400, "prompt")
    error(client.post("/tokenize", json={"prompt": "a", "extra": 1}), 400, "extra")
    error(client.post("/tokenize", json={"messages": [{"role": "user", "content": "BAD"}]}), 400, "messages")
    error(client.post("/tokenize", json={"prompt": "a", "model": "x"}), 404, "model")
    error(client.post("/detokenize", json={"tokens": [999]}), 400, "tokens")


def test_openapi_describes_exactly_the_accepted_fields():
    _, client = make()
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v1/chat/completions" in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert set(schemas["ChatCompletionRequest"]["properties"]) == P.CHAT_FIELDS
    assert set(schemas["CompletionRequest"]["properties"]) == P.COMPLETION_FIELDS
    assert doc == build_openapi("fake-model", doc["info"]["version"])


def test_lifespan_starts_and_stops_the_engine():
    engine, client = make()
    with client:
        assert engine.started and not engine.stopped
    assert engine.stopped


def test_the_official_openai_client_parses_our_objects_and_errors():
    import openai
    _, client = make()
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    reply = oai.chat.completions.create(model="fake-model", messages=MSG, max_tokens=3, logprobs=True, top_logprobs=1)
    assert reply.choices[0].message.content == "abc" and reply.usage.total_tokens == PROMPT_LEN + 3
    assert reply.choices[0].logprobs.content[1].top_logprobs[0].token == "b"
    chunks = list(oai.chat.completions.create(model="fake-model", messages=MSG, max_tokens=3, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert chunks[-1].usage.completion_tokens == 3
    completion = oai.completions.create(model="fake-model", prompt="x", max_tokens=2, logprobs=1)
    assert completion.choices[0].text == "ab" and completion.choices[0].logprobs.text_offset == [0, 1]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="fake-model", messages=MSG, temperature=-1)
    assert info.value.param == "temperature"
