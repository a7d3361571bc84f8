"""Server-side chat sessions (/v1/sessions) over a real AsyncEngine with a tiny random model,
one app for the module (Starlette's TestClient runs its lifespan, so the engine thread is
real). The KV pool is small (40 blocks of 16 tokens) so that a few unrelated requests evict
every unpinned cached block: what survives them survives because a session pinned it."""

import asyncio
import re

import pytest
from starlette.testclient import TestClient

from gateway.api.app import build_app
from gateway.api.sessions import SessionStore
from gateway.config import Config
from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(300)

NUM_BLOCKS = 40
LONG_TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 14


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_model_dir):
    from gateway.engine.async_engine import AsyncEngine
    from gateway.metrics import ServerMetrics
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", default_model_dir)
    config = Config(model=str(model), num_kv_blocks=NUM_BLOCKS, block_size=16, max_sessions=3,
                    session_kv_budget_blocks=32, dtype="float32")
    metrics_box = []
    engine = AsyncEngine.from_config(config, step_listener=lambda stats: metrics_box[0].on_step(stats))
    metrics_box.append(ServerMetrics(engine.model_name, max_model_len=engine.max_model_len))
    with TestClient(build_app(engine, config, metrics_box[0])) as client:
        yield client, engine


@pytest.fixture
def client(served):
    client, engine = served
    created = []

    def new_session(**body) -> str:
        created.append(client.post("/v1/sessions", json=body).json()["id"])
        return created[-1]
    client.new_session = new_session   # sessions made through this are deleted after the test
    yield client
    for session_id in created:
        client.delete(f"/v1/sessions/{session_id}")


def counters(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    def value(name):
        return float(re.search(rf"^gateway:{name}_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
    return value("prefix_cache_hits"), value("prefix_cache_queries")


def say(client, session_id, content, **extra):
    response = client.post(f"/v1/sessions/{session_id}/chat",
                           json={"content": content, "max_tokens": 4, "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response


def evict_unpinned_blocks(client) -> None:
    """Three prompts of 18 fresh blocks each: more than the free list holds, so every block
    that is not held by someone is reallocated (and its cache entry dropped)."""
    for i in range(3):
        prompt = [1000 + 300 * i + j for j in range(18 * 16)]
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code == 200


def test_a_turn_after_revert_computes_only_its_new_tokens(client):
    session_id = client.new_session(system="You are the session under test.")
    say(client, session_id, LONG_TEXT)
    say(client, session_id, "And now something else entirely.")
    reverted = client.post(f"/v1/sessions/{session_id}/revert", json={"turn": 1}).json()
    assert [t["turn"] for t in reverted["turns"]] == [0] and reverted["pinned_blocks"] >= 10

    control = [{"role": "user", "content": LONG_TEXT}]   # the same text, not in a session
    client.post("/v1/chat/completions", json={"messages": control, "max_tokens": 1})
    evict_unpinned_blocks(client)

    hits, queries = counters(client)
    client.post("/v1/chat/completions", json={"messages": control, "max_tokens": 1})
    control_hits, control_queries = counters(client)
    assert control_hits - hits == 0 and control_queries > queries   # the eviction really evicted

    say(client, session_id, "A third question.")
    new_hits, new_queries = counters(client)
    assert (new_hits - control_hits) / (new_queries - control_queries) > 0.8
    turns = client.get(f"/v1/sessions/{session_id}").json()["turns"]
    assert [t["messages"][0]["content"] for t in turns] == [LONG_TEXT, "A third question."]


def test_chat_answers_in_chat_completion_shapes_and_records_each_turn(client):
    session_id = client.new_session()
    full = say(client, session_id, "Hello", max_tokens=3).json()
    assert full["object"] == "chat.completion" and full["choices"][0]["finish_reason"] == "length"
    streamed = client.post(f"/v1/sessions/{session_id}/chat",
                           json={"messages": [{"role": "user", "content": "Again"}], "stream": True,
                                 "max_tokens": 3, "temperature": 0})
    frames = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert '"chat.completion.chunk"' in frames[0] and streamed.text.rstrip().endswith("data: [DONE]")
    session = client.get(f"/v1/sessions/{session_id}").json()
    assert [t["messages"] for t in session["turns"]] == [[{"role": "user", "content": "Hello"}],
                                                         [{"role": "user", "content": "Again"}]]
    assert session["turns"][0]["reply"] == full["choices"][0]["message"]["content"]


def test_unknown_ids_are_404_and_bad_requests_are_400(client):
    for method, path, body in [("get", "/v1/sessions/nope", None), ("delete", "/v1/sessions/nope", None),
                               ("post", "/v1/sessions/nope/chat", {"content": "hi"}),
                               ("post", "/v1/sessions/nope/revert", {"turn": 0})]:
        response = client.request(method.upper(), path, json=body)
        assert response.status_code == 404 and response.json()["error"]["code"] == "session_not_found"
    session_id = client.new_session()
    say(client, session_id, "Hello")
    assert client.post(f"/v1/sessions/{session_id}/revert", json={"turn": 1}).status_code == 400
    history = {"messages": [{"role": "assistant", "content": "x"}]}
    assert client.post(f"/v1/sessions/{session_id}/chat", json=history).status_code == 400
    assert client.post(f"/v1/sessions/{session_id}/chat", json={"content": "x", "n": 2}).status_code == 400


def test_a_busy_session_refuses_a_second_chat_and_a_revert(client):
    store = next(route.endpoint.__self__.store for route in client.app.routes if route.path == "/v1/sessions")
    session_id = client.new_session()
    say(client, session_id, "Hello")
    store.sessions[session_id].busy = True     # as while a reply streams
    try:
        for path, body in [("chat", {"content": "again"}), ("revert", {"turn": 0})]:
            response = client.post(f"/v1/sessions/{session_id}/{path}", json=body)
            assert response.status_code == 409 and response.json()["error"]["code"] == "session_busy"
        assert len(client.get(f"/v1/sessions/{session_id}").json()["turns"]) == 1
    finally:
        store.sessions[session_id].busy = False


def test_sessions_over_the_limit_are_429(client):
    for _ in range(3):
        client.new_session()
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_sessions"


def test_pins_give_way_when_a_request_needs_their_blocks(served, client):
    _, engine = served
    for i in range(2):
        say(client, client.new_session(system=f"Session number {i}."), LONG_TEXT)
    assert engine.num_kv_blocks_in_use() >= 20                      # both conversations pinned
    prompt = [500 + j for j in range(400)]                         # needs 26 of the 40 blocks
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"


def test_deleting_the_sessions_frees_every_block(served, client):
    _, engine = served
    ids = [client.new_session(), client.new_session()]
    for session_id in ids:
        say(client, session_id, LONG_TEXT + session_id)
    assert engine.num_kv_blocks_in_use() > 0
    for session_id in ids:
        assert client.delete(f"/v1/sessions/{session_id}").json()["deleted"] is True
    assert client.get(f"/v1/sessions/{ids[0]}").status_code == 404
    assert engine.num_kv_blocks_in_use() == 0
    engine.core.scheduler.block_pool.check_invariants()


class _RecordingEngine:
    def __init__(self):
        self.unpinned = []

    async def unpin_prefix(self, key):
        self.unpinned.append(key)
        return 0


def test_idle_sessions_expire_and_are_unpinned():
    asyncio.run(_expire_idle_sessions())


async def _expire_idle_sessions():
    now = [100.0]
    engine = _RecordingEngine()
    store = SessionStore(engine, Config(session_ttl_s=60), clock=lambda: now[0])
    old, fresh = store.create(None), store.create(None)
    now[0] = 130.0
    fresh.last_used = now[0]
    now[0] = 161.0
    await store.sweep()
    assert list(store.sessions) == [fresh.id] and engine.unpinned == [old.id]
    await store.close()
    assert engine.unpinned == [old.id, fresh.id] and not store.sessions
