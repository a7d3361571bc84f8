"""Structured-output request fields → SamplingParams constraint keywords (json_schema / regex).

OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any
JSON object) and {"type": "json_schema", "json_schema": {"name", "schema", "strict",
"description"}}; vLLM's extra body fields `guided_json` (a schema, object or JSON text),
`guided_regex`, `guided_choice` (a list of strings: the output is one of them) and
`guided_grammar` (a lark grammar in llguidance's dialect, or GBNF, llama.cpp's EBNF). At most
one of them per request. The schema itself is compiled and checked by
SamplingParams (sampling/grammar.py), whose errors the caller renames to the field sent here
(FIELD_OF)."""

from __future__ import annotations

import orjson

from gateway.api.errors import invalid

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
MAX_GUIDED_CHOICES = 256
MAX_SCHEMA_BYTES = 64 * 1024   # compiled on the event loop: bounded so one request cannot stall it
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
ANY_OBJECT = {"type": "object"}


def _schema_size_ok(schema, param: str) -> None:
    text = schema if isinstance(schema, str) else orjson.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise invalid(param, f"`{param}`: the schema is {len(text)} bytes, more than {MAX_SCHEMA_BYTES}",
                      code="grammar_too_large")


def _json_schema(spec, param: str) -> dict:
    if not isinstance(spec, dict):
        raise invalid(param, f"`{param}` must be an object with `name` and `schema`")
    extra = set(spec) - _JSON_SCHEMA_KEYS
    if extra:
        raise invalid(f"{param}.{sorted(extra)[0]}", f"`{param}` has unknown fields {sorted(extra)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{param}.name", f"`{param}.name` must be a non-empty string")
    for key, kind in (("strict", bool), ("description", str)):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise invalid(f"{param}.{key}", f"`{param}.{key}` must be a {kind.__name__}", code="invalid_type")
    schema = spec.get("schema", ANY_OBJECT)
    if not isinstance(schema, dict):
        raise invalid(f"{param}.schema", f"`{param}.schema` must be a JSON schema object")
    _schema_size_ok(schema, f"{param}.schema")
    return schema


def _response_format(value) -> dict:
    if not isinstance(value, dict):
        raise invalid("response_format", "`response_format` must be an object", code="invalid_type")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise invalid("response_format.type", "`response_format.type` must be one of "
                                              f"{sorted(allowed)}, got {kind!r}")
    extra = set(value) - allowed[kind]
    if extra:
        raise invalid(f"response_format.{sorted(extra)[0]}",
                      f"`response_format` of type {kind!r} takes no {sorted(extra)}")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": ANY_OBJECT}
    return {"json_schema": _json_schema(value.get("json_schema"), "response_format.json_schema")}


def parse(body: dict) -> tuple[dict, str | None]:
    """(SamplingParams keywords, the field they came from) for the one structured-output field
    the body sends (null counts as absent); ({}, None) when it sends none."""
    sent = [name for name in FIELDS if body.get(name) is not None]
    if len(sent) > 1:
        raise invalid(sent[1], f"send one of {list(FIELDS)}, not {sent}")
    if not sent:
        return {}, None
    name, value = sent[0], body[sent[0]]
    if name == "response_format":
        return _response_format(value), name
    if name == "guided_json":
        if not isinstance(value, (dict, str)):
            raise invalid(name, "`guided_json` must be a JSON schema (an object or its JSON text)")
        _schema_size_ok(value, name)
        return {"json_schema": value}, name
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise invalid(name, "`guided_choice` must be a non-empty array of non-empty strings")
        if len(value) > MAX_GUIDED_CHOICES:
            raise invalid(name, f"`guided_choice` has {len(value)} entries, more than {MAX_GUIDED_CHOICES}",
                          code="array_above_max_length")
        _schema_size_ok(value, name)
        return {"choice": value}, name
    if not isinstance(value, str):
        raise invalid(name, f"`{name}` must be a string", code="invalid_type")
    _schema_size_ok(value, name)
    return {"regex": value} if name == "guided_regex" else {"grammar": value}, name
