"""Structured output over HTTP (api/structured.py → SamplingParams → the grammar-constrained
sampler): request parsing and its 400s, then the official `openai` client against a real
in-process server on the default model, where json_object and a strict json_schema answer
(non-streamed and streamed, chat and completions, temperature 1.0 over several seeds) always
parse and validate (`jsonschema`) when they stop, and the bounded schema always stops."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gateway.api import protocol as P
from gateway.api.errors import APIError
from live_server import LiveServer

INFO = P.ModelInfo(name="m", vocab_size=49152, max_model_len=512)
MSG = [{"role": "user", "content": "hi"}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "Lima", "Oslo"]}}}
STRICT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
PROMPT = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
SEEDS = (1, 2, 3)


def chat(**fields):
    return P.parse_chat({"model": "m", "messages": MSG, **fields}, INFO)


@pytest.mark.parametrize("fields, expected", [
    (dict(response_format={"type": "text"}), (None, None)),
    (dict(response_format={"type": "json_object"}), ({"type": "object"}, None)),
    (dict(response_format=STRICT), (PERSON, None)),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), ({"type": "object"}, None)),
    (dict(guided_json=PERSON), (PERSON, None)),
    (dict(guided_regex="[ab]{3}"), (None, "[ab]{3}")),
    (dict(response_format=None), (None, None)),
])
def test_accepted_constraints(fields, expected):
    params = chat(**fields).params
    assert (params.json_schema, params.regex) == expected


@pytest.mark.parametrize("fields, param, says", [
    (dict(response_format={"type": "xml"}), "response_format.type", "must be one of"),
    (dict(response_format="json"), "response_format", "object"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema", "name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}),
     "response_format.json_schema.name", "name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": []}}),
     "response_format.json_schema.schema", "schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "foo"}}}),
     "response_format", "Invalid type: foo"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/x"}}}),
     "response_format", "does not exist"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": 1}}),
     "response_format.json_schema.strict", "bool"),
    (dict(response_format={"type": "json_object", "json_schema": {}}), "response_format.json_schema", "takes no"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"enum": ["x" * 1000] * 100}}}), "response_format.json_schema.schema", "bytes"),
    (dict(guided_json={"type": "nope"}), "guided_json", "Invalid type"),
    (dict(guided_regex="(unclosed"), "guided_regex", "invalid regex"),
    (dict(guided_json=PERSON, response_format={"type": "json_object"}), "guided_json", "send one of"),
])
def test_bad_constraints_are_400s_naming_the_field(fields, param, says):
    with pytest.raises(APIError) as info:
        chat(**fields)
    assert (info.value.status, info.value.param) == (400, param), info.value.message
    assert says in info.value.message


def test_completions_take_response_format_too():
    req = P.parse_completion({"prompt": "x", "response_format": {"type": "json_object"}}, INFO)
    assert req.params.json_schema == {"type": "object"}


@pytest.fixture(scope="module")
def client():
    with LiveServer(model=None, num_kv_blocks=128, block_size=16, max_model_len=512) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check(text: str, finish_reason: str, schema: dict, must_stop: bool) -> bool:
    """True when the answer stopped (then it must validate); a cut-off one is allowed only
    where the schema is unbounded."""
    if finish_reason == "length":
        assert not must_stop, f"a bounded schema did not stop: {text!r}"
        return False
    assert finish_reason == "stop", (finish_reason, text)
    jsonschema.validate(json.loads(text), schema)
    return True


def test_strict_json_schema_always_validates(client):
    for seed in SEEDS:
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, response_format=STRICT,
                                           temperature=1.0, seed=seed, max_tokens=200, n=2)
        for choice in r.choices:
            _check(choice.message.content, choice.finish_reason, PERSON, must_stop=True)


def test_streamed_json_schema_reassembles_and_validates(client):
    for seed in SEEDS:
        text, finish = "", None
        for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, stream=True,
                                                    response_format=STRICT, temperature=1.0, seed=seed,
                                                    max_tokens=200):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        _check(text, finish, PERSON, must_stop=True)


def test_json_object_is_an_object_whenever_it_stops(client):
    stopped = 0
    for seed in SEEDS:
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, temperature=1.0,
                                           seed=seed, max_tokens=120, response_format={"type": "json_object"})
        choice = r.choices[0]
        stopped += _check(choice.message.content, choice.finish_reason, {"type": "object"}, must_stop=False)
        assert choice.message.content.startswith("{")
    assert stopped, "no json_object answer stopped within max_tokens"


def test_completions_endpoint_is_constrained(client):
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="A person:", max_tokens=200,
                                  temperature=1.0, seed=5, extra_body={"guided_json": PERSON})
    _check(r.choices[0].text, r.choices[0].finish_reason, PERSON, must_stop=True)


def test_bad_schema_over_http_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "foo"}}})
    assert info.value.body["param"] == "response_format" and "foo" in info.value.body["message"]
