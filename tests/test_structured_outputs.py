"""vLLM's `structured_outputs` request field (api/structured.py): each constraint kind becomes
the same SamplingParams constraint as its guided_* field, every wrong shape is a 400 naming
structured_outputs.<key>, it excludes response_format / guided_* / tools, /openapi.json
describes it, and over HTTP (the openai client's extra_body, chat and completions, a tiny
random model) the output obeys it."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gateway.api import protocol as P
from gateway.api.errors import APIError
from gateway.api.openapi import CHAT_REQUEST, COMPLETION_REQUEST
from live_server import LiveServer

INFO = P.ModelInfo(name="m", vocab_size=49152, max_model_len=512)
MSG = [{"role": "user", "content": "hi"}]
COLOR = {"type": "object", "additionalProperties": False, "required": ["color"],
         "properties": {"color": {"enum": ["red", "green"]}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def chat(so, **fields):
    return P.parse_chat({"messages": MSG, "structured_outputs": so, **fields}, INFO)


def completion(so, **fields):
    return P.parse_completion({"prompt": "x", "structured_outputs": so, **fields}, INFO)


@pytest.mark.parametrize("so, key", [
    ({"json": COLOR}, ("json_schema", json.dumps(COLOR, separators=(",", ":")))),
    ({"json": json.dumps(COLOR)}, ("json_schema", json.dumps(COLOR))),
    ({"regex": "[ab]{3}"}, ("regex", "[ab]{3}")),
    ({"choice": ["yes", "no"]}, ("lark", 'start: "yes" | "no"')),
    ({"grammar": 'start: "a"+'}, ("lark", 'start: "a"+')),
    ({"json_object": True}, ("json_schema", '{"type":"object"}')),
    ({"choice": ["x"], "regex": None, "disable_any_whitespace": True, "disable_fallback": False}, ("lark", 'start: "x"')),
])
def test_each_kind_is_the_constraint_of_its_guided_field(so, key):
    assert chat(so).params.grammar_key == key
    assert completion(so).params.grammar_key == key


def test_it_means_exactly_what_the_guided_field_means():
    for kind, guided, value in (("json", "guided_json", COLOR), ("regex", "guided_regex", "a+b"),
                                ("choice", "guided_choice", ["p", "q"]), ("grammar", "guided_grammar", 'start: "z"')):
        via_guided = P.parse_chat({"messages": MSG, guided: value}, INFO).params
        assert chat({kind: value}).params == via_guided


@pytest.mark.parametrize("so, param, code", [
    ({}, "structured_outputs", "invalid_value"),
    ({"json": None}, "structured_outputs", "invalid_value"),
    ({"json": COLOR, "regex": "a"}, "structured_outputs.regex", "invalid_value"),
    ({"choice": ["a"], "json_object": True}, "structured_outputs.json_object", "invalid_value"),
    ({"json_object": False}, "structured_outputs.json_object", "invalid_type"),
    ({"jsonn": COLOR}, "structured_outputs.jsonn", "unknown_parameter"),
    ({"json": COLOR, "backend": "xgrammar"}, "structured_outputs.backend", "unknown_parameter"),
    ({"json": COLOR, "structural_tag": "{}"}, "structured_outputs.structural_tag", "unsupported_parameter"),
    ({"json": COLOR, "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern", "unsupported_parameter"),
    ({"json": COLOR, "disable_additional_properties": True}, "structured_outputs.disable_additional_properties",
     "unsupported_parameter"),
    ({"json": COLOR, "disable_any_whitespace": "yes"}, "structured_outputs.disable_any_whitespace", "invalid_type"),
    ({"json": 3}, "structured_outputs.json", "invalid_value"),
    ({"json": {"type": "nope"}}, "structured_outputs.json", "invalid_value"),
    ({"regex": "("}, "structured_outputs.regex", "invalid_value"),
    ({"regex": 5}, "structured_outputs.regex", "invalid_type"),
    ({"choice": []}, "structured_outputs.choice", "invalid_value"),
    ({"choice": ["a"] * 300}, "structured_outputs.choice", "array_above_max_length"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar", "invalid_value"),
    ({"json": {"type": "string", "description": "x" * 70_000}}, "structured_outputs.json", "grammar_too_large"),
    ("json", "structured_outputs", "invalid_type"),
    ([{"json": COLOR}], "structured_outputs", "invalid_type"),
])
def test_bad_structured_outputs_are_400s_naming_the_key(so, param, code):
    with pytest.raises(APIError) as info:
        chat(so)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code), info.value


@pytest.mark.parametrize("fields", [dict(response_format={"type": "json_object"}), dict(guided_json=COLOR),
                                    dict(guided_regex="a"), dict(guided_choice=["a"]), dict(guided_grammar='start: "a"')])
def test_it_cannot_join_another_structured_output_field(fields):
    for parse in (chat, completion):
        with pytest.raises(APIError) as info:
            parse({"json": COLOR}, **fields)
        assert info.value.status == 400 and info.value.param == "structured_outputs"


def test_it_cannot_join_active_tools_but_tool_choice_none_is_fine():
    with pytest.raises(APIError) as info:
        chat({"choice": ["a"]}, tools=TOOLS)
    assert (info.value.status, info.value.param) == (400, "structured_outputs.choice")
    assert chat({"choice": ["a"]}, tools=TOOLS, tool_choice="none").params.choice == ["a"]


def test_null_structured_outputs_is_absent():
    assert chat(None).params.grammar_key is None


def test_openapi_describes_it():
    for request in (CHAT_REQUEST, COMPLETION_REQUEST):
        schema = request["properties"]["structured_outputs"]
        for good in ({"json": COLOR}, {"regex": "a"}, {"choice": ["a"]}, {"grammar": "x"}, {"json_object": True},
                     {"json": COLOR, "regex": None, "disable_any_whitespace": True}, None):
            jsonschema.validate(good, schema)
        for bad in ({}, {"json": COLOR, "regex": "a"}, {"json_object": False}, {"jsonn": {}},
                    {"json": COLOR, "structural_tag": "{}"}):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)


# ---- over HTTP, with the openai client's extra_body ----------------------------------------

@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120), \
            live.engine.model_name


def test_the_output_obeys_it_over_http(client):
    api, model = client
    for seed in (1, 2, 3):
        r = api.chat.completions.create(model=model, messages=MSG, temperature=1.0, seed=seed, max_tokens=16,
                                        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
        assert r.choices[0].message.content in ("sunny", "rainy") and r.choices[0].finish_reason == "stop"
        r = api.completions.create(model=model, prompt="Code:", temperature=1.0, seed=seed, max_tokens=16,
                                   extra_body={"structured_outputs": {"regex": "[A-F]{2}-[0-9]{3}"}})
        text = r.choices[0].text
        assert len(text) == 6 and text[:2].isalpha() and text[2] == "-" and text[3:].isdigit(), text
        r = api.chat.completions.create(model=model, messages=MSG, temperature=1.0, seed=seed, max_tokens=32,
                                        extra_body={"structured_outputs": {"json": COLOR}})
        jsonschema.validate(json.loads(r.choices[0].message.content), COLOR)
    stream = api.chat.completions.create(model=model, messages=MSG, temperature=1.0, seed=5, max_tokens=32,
                                         stream=True, extra_body={"structured_outputs": {"json": COLOR}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), COLOR)


def test_bad_ones_over_http_are_400s(client):
    api, model = client
    for so, param in (({"json": COLOR, "regex": "a"}, "structured_outputs.regex"),
                      ({"schema": COLOR}, "structured_outputs.schema")):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=model, messages=MSG, max_tokens=4, extra_body={"structured_outputs": so})
        assert info.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=model, messages=MSG, max_tokens=4, response_format={"type": "json_object"},
                                    extra_body={"structured_outputs": {"json_object": True}})
    assert info.value.body["param"] == "structured_outputs"
