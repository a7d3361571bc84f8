"""Structured-output request fields → SamplingParams constraint keywords (json_schema / regex).

OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any
JSON object) and {"type": "json_schema", "json_schema": {"name", "schema", "strict",
"description"}}; vLLM's extra body fields `guided_json` (a schema, object or JSON text),
`guided_regex`, `guided_choice` (a list of strings: the output is one of them) and
`guided_grammar` (a lark grammar in llguidance's dialect, or GBNF, llama.cpp's EBNF); and
vLLM's newer `structured_outputs` object (its StructuredOutputsParams: exactly one of `json`,
`regex`, `choice`, `grammar`, `json_object: true`, each read as the guided_* field of that kind).
At most one of these fields per request. The schema itself is compiled and checked by
SamplingParams (sampling/grammar.py), whose errors the caller renames to the field sent here
(FIELD_OF)."""

from __future__ import annotations

import orjson

from gateway.api.errors import invalid

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
MAX_GUIDED_CHOICES = 256
MAX_SCHEMA_BYTES = 64 * 1024   # compiled on the event loop: bounded so one request cannot stall it
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
ANY_OBJECT = {"type": "object"}
# structured_outputs: constraint key → the guided_* field it means
STRUCTURED_KINDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
                    "grammar": "guided_grammar", "json_object": None}
# vLLM options that change nothing here: our JSON is already compact (no optional whitespace, so
# disable_any_whitespace either way is honoured) and there is no second backend to fall back to
STRUCTURED_NO_OPS = {"disable_any_whitespace", "disable_fallback"}
STRUCTURED_UNSUPPORTED = {"disable_additional_properties", "whitespace_pattern", "structural_tag"}


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


def _structured_outputs(value) -> tuple[dict, str]:
    """vLLM's structured_outputs object → (SamplingParams keywords, the field errors name)."""
    where = "structured_outputs"
    if not isinstance(value, dict):
        raise invalid(where, f"`{where}` must be an object", code="invalid_type")
    for key in sorted(value):
        if key in STRUCTURED_UNSUPPORTED and value[key] is not None and value[key] is not False:
            raise invalid(f"{where}.{key}", f"`{where}.{key}` is not supported by this server",
                          code="unsupported_parameter")
        if key not in STRUCTURED_KINDS and key not in STRUCTURED_NO_OPS | STRUCTURED_UNSUPPORTED:
            raise invalid(f"{where}.{key}", f"`{where}` has an unknown field {key!r}; it takes one of "
                                            f"{sorted(STRUCTURED_KINDS)}", code="unknown_parameter")
    for key in sorted(STRUCTURED_NO_OPS & set(value)):
        if value[key] is not None and not isinstance(value[key], bool):
            raise invalid(f"{where}.{key}", f"`{where}.{key}` must be a boolean", code="invalid_type")
    sent = [key for key in STRUCTURED_KINDS if value.get(key) is not None]
    if len(sent) != 1:
        raise invalid(f"{where}.{sent[1]}" if sent else where,
                      f"`{where}` must set exactly one of {sorted(STRUCTURED_KINDS)}, got {sent or 'none'}")
    key = sent[0]
    param = f"{where}.{key}"
    if key == "json_object":
        if value[key] is not True:
            raise invalid(param, f"`{param}` must be true (or left out)", code="invalid_type")
        return {"json_schema": ANY_OBJECT}, param
    return _guided(STRUCTURED_KINDS[key], value[key], param), param


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
    if name == "structured_outputs":
        return _structured_outputs(value)
    return _guided(name, value, name), name


def _guided(name: str, value, param: str) -> dict:
    """One guided_* field's value → SamplingParams keywords; errors name `param`."""
    if name == "guided_json":
        if not isinstance(value, (dict, str)):
            raise invalid(param, f"`{param}` must be a JSON schema (an object or its JSON text)")
        _schema_size_ok(value, param)
        return {"json_schema": value}
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise invalid(param, f"`{param}` must be a non-empty array of non-empty strings")
        if len(value) > MAX_GUIDED_CHOICES:
            raise invalid(param, f"`{param}` has {len(value)} entries, more than {MAX_GUIDED_CHOICES}",
                          code="array_above_max_length")
        _schema_size_ok(value, param)
        return {"choice": value}
    if not isinstance(value, str):
        raise invalid(param, f"`{param}` must be a string", code="invalid_type")
    _schema_size_ok(value, param)
    return {"regex": value} if name == "guided_regex" else {"grammar": value}
