"""`gateway chat`'s `config set response_format=json_object`: the setting's parsing, what each
backend sends (SamplingParams json_schema in process, response_format over HTTP), and replies
from a tiny random-weight model that start as a JSON object only because of the constraint
(unconstrained, such a model almost never writes "{" first)."""

from __future__ import annotations

import json

import pytest

from gateway.chat import ChatSession
from gateway.chat_backends import HttpBackend, InProcessBackend
from live_server import LiveServer

MESSAGES = [{"role": "user", "content": "Describe yourself."}]


def test_the_setting_parses_and_reaches_both_backends_fields():
    session = ChatSession()
    session.set("response_format", "json")
    assert session.settings.response_format == "json_object"
    assert session.settings.sampling_fields()["json_schema"] == {"type": "object"}
    sent = session.settings.non_default_fields()
    assert sent["response_format"] == {"type": "json_object"} and "json_schema" not in sent
    assert "response_format = json_object" in session.config_lines()
    session.set("response_format", "text")
    assert session.settings.response_format is None and "json_schema" not in session.settings.sampling_fields()
    assert "response_format" not in session.settings.non_default_fields()
    with pytest.raises(ValueError, match="response_format must be"):
        session.set("response_format", "xml")


def _check_object_start(reply: str) -> None:
    assert reply.startswith("{"), reply
    try:
        value = json.loads(reply)
    except ValueError:   # cut off by max_tokens: only a complete reply must parse
        return
    assert isinstance(value, dict)


@pytest.fixture(scope="module")
def json_session():
    session = ChatSession(temperature=1.0, max_tokens=24)
    session.set("response_format", "json_object")
    session.set("seed", "3")
    return session


def test_in_process_replies_are_json_objects(tiny_llama_dir, json_session):
    from gateway.engine.llm import LLM
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256)
    try:
        backend = InProcessBackend(llm)
        _check_object_start("".join(backend.stream(MESSAGES, json_session.settings)))
        plain = ChatSession(temperature=1.0, max_tokens=24, seed=3).settings
        assert not "".join(backend.stream(MESSAGES, plain)).startswith("{")   # the constraint made the difference
    finally:
        llm.close()


def test_http_replies_are_json_objects(tiny_llama_dir, json_session):
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256) as live:
        backend = HttpBackend(live.url)
        _check_object_start("".join(backend.stream(MESSAGES, json_session.settings)))
