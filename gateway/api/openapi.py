"""The /openapi.json document (OpenAPI 3.1), written by hand.

The request-body schemas describe exactly what gateway/api/protocol.py accepts: the same field
names (tests/test_api_app.py checks the sets match), `additionalProperties: false` because
unknown fields are 400s, and the same ranges; the /v1/sessions* routes are those of
gateway/api/sessions.py. Pure data: building it has no side effects."""

from __future__ import annotations

from gateway.api.protocol import (MAX_CHOICES, MAX_CONTENT_PARTS, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_MESSAGES,
                                  MAX_STOP, MAX_STOP_TOKEN_IDS)
from gateway.api.structured import MAX_GUIDED_CHOICES
from gateway.api.tools import MAX_TOOLS

_INT, _NUM, _BOOL, _STR = {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "string"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_STRUCTURED_OPTIONS = {"disable_any_whitespace": _nullable(_BOOL), "disable_fallback": _nullable(_BOOL),
                       "disable_additional_properties": _nullable({"const": False}),
                       "whitespace_pattern": {"type": "null"}, "structural_tag": {"type": "null"}}
_STRUCTURED_KINDS = {
    "json": {"anyOf": [{"type": "object"}, _STR], "description": "a JSON schema (as guided_json)"},
    "regex": {**_STR, "description": "the output matches this regex"},
    "choice": {"type": "array", "items": {**_STR, "minLength": 1}, "minItems": 1, "maxItems": MAX_GUIDED_CHOICES},
    "grammar": {**_STR, "description": "a lark grammar (llguidance's dialect) or GBNF"},
    "json_object": {"const": True, "description": "any JSON object"},
}
_STRUCTURED_OUTPUTS = {
    "oneOf": [{"type": "object", "required": [kind], "additionalProperties": False,
               "properties": {kind: schema, **{k: {"type": "null"} for k in _STRUCTURED_KINDS if k != kind},
                              **_STRUCTURED_OPTIONS}}
              for kind, schema in _STRUCTURED_KINDS.items()],
    "description": "vLLM's StructuredOutputsParams: exactly one constraint; not with response_format, "
                   "guided_* or tools; whitespace_pattern, structural_tag and disable_additional_properties "
                   "are not supported (400)"}

_SAMPLING = {
    "model": {**_STR, "description": "must be the served model name when given"},
    "max_tokens": {**_INT, "minimum": 1, "description": "default: the rest of the context window"},
    "n": {**_INT, "minimum": 1, "maximum": MAX_CHOICES, "default": 1},
    "stream": {**_BOOL, "default": False},
    "stream_options": {"type": "object", "additionalProperties": False,
                       "properties": {"include_usage": _BOOL}, "description": "only with stream=true"},
    "temperature": {**_NUM, "minimum": 0, "default": 1},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {**_INT, "minimum": -1, "default": 0, "description": "0 or -1 disable"},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1, "default": 0},
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2, "default": 0},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0, "default": 1},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "maxProperties": MAX_LOGIT_BIAS,
                   "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100},
                   "description": "token id (as a string) → bias; ids must be in the vocabulary"},
    "seed": {**_INT, "description": "choice i of n uses seed + i"},
    "stop": {"anyOf": [{**_STR, "minLength": 1},
                       {"type": "array", "items": {**_STR, "minLength": 1}, "maxItems": MAX_STOP}]},
    "stop_token_ids": {"type": "array", "items": {**_INT, "minimum": 0}, "maxItems": MAX_STOP_TOKEN_IDS},
    "ignore_eos": {**_BOOL, "default": False},
    "min_tokens": {**_INT, "minimum": 0, "default": 0},
    "skip_special_tokens": {**_BOOL, "default": True},
    "user": {**_STR, "description": "accepted, unused"},
    "metadata": {"type": "object", "description": "accepted, unused"},
    "store": {"const": False, "description": "only false: nothing is stored"},
    "response_format": {"oneOf": [
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {**_STR, "minLength": 1}, "schema": {"type": "object"},
                            "strict": _BOOL, "description": _STR}}}}],
        "description": "constrains the output to JSON (any object, or one matching the schema); "
                       "at most one of response_format, guided_json, guided_regex, guided_choice, guided_grammar, "
                       "structured_outputs"},
    "guided_json": {"anyOf": [{"type": "object"}, _STR], "description": "vLLM: a JSON schema"},
    "guided_regex": {**_STR, "description": "vLLM: the output matches this regex"},
    "guided_choice": {"type": "array", "items": {**_STR, "minLength": 1}, "minItems": 1,
                      "maxItems": MAX_GUIDED_CHOICES, "description": "vLLM: the output is one of these strings"},
    "guided_grammar": {**_STR, "description": "vLLM: a lark grammar (llguidance's dialect) or GBNF"},
    "structured_outputs": _STRUCTURED_OUTPUTS,
}
_NULLABLE_SAMPLING = {k: _nullable(v) for k, v in _SAMPLING.items()}

_TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
              "properties": {"type": {"const": "text"}, "text": _STR}}
_MESSAGE = {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"], "description": "developer → system"},
        "content": {"anyOf": [_STR, {"type": "array", "items": _TEXT_PART, "maxItems": MAX_CONTENT_PARTS}]},
    },
}
_TOKEN_IDS = {"type": "array", "items": {**_INT, "minimum": 0}, "minItems": 1}
_TOOL_CALL = {"type": "object", "required": ["id", "function"], "additionalProperties": False,
              "properties": {"id": _STR, "type": {"const": "function"}, "function": {
                  "type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                  "properties": {"name": _STR, "arguments": {**_STR, "description": "JSON text"}}}}}
_CONTENT = _MESSAGE["properties"]["content"]
_CHAT_MESSAGE = {"oneOf": [
    _MESSAGE,
    {"type": "object", "required": ["role", "tool_calls"], "additionalProperties": False,
     "properties": {"role": {"const": "assistant"}, "content": _nullable(_CONTENT),
                    "tool_calls": {"type": "array", "items": _TOOL_CALL, "minItems": 1, "maxItems": MAX_TOOLS}}},
    {"type": "object", "required": ["role", "content", "tool_call_id"], "additionalProperties": False,
     "properties": {"role": {"const": "tool"}, "content": _CONTENT, "tool_call_id": {**_STR, "minLength": 1}}}]}
_TOOL = {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {**_STR, "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": _STR, "strict": _BOOL,
        "parameters": {"type": "object", "description": "a JSON schema; the arguments of a forced call match it"}}}}}
_TOOLS = {
    "tools": _nullable({"type": "array", "items": _TOOL, "minItems": 1, "maxItems": MAX_TOOLS,
                        "description": "function tools (names unique)"}),
    "tool_choice": _nullable({"anyOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
            "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                        "additionalProperties": False, "properties": {"name": _STR}}}}],
        "description": "default auto with tools; anything but none needs tools; a named function must be in tools; "
                       "not with response_format or guided_*"}),
    "parallel_tool_calls": _nullable({**_BOOL, "default": True}),
}

CHAT_REQUEST = {
    "type": "object", "required": ["messages"], "additionalProperties": False,
    "properties": {
        **_NULLABLE_SAMPLING,
        **_TOOLS,
        "messages": {"type": "array", "items": _CHAT_MESSAGE, "minItems": 1, "maxItems": MAX_MESSAGES},
        "max_completion_tokens": _nullable({**_INT, "minimum": 1}),
        "logprobs": _nullable(_BOOL),
        "top_logprobs": _nullable({**_INT, "minimum": 0, "maximum": MAX_LOGPROBS,
                                   "description": "requires logprobs=true"}),
    },
}
COMPLETION_REQUEST = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        **_NULLABLE_SAMPLING,
        "prompt": {"anyOf": [_STR, _TOKEN_IDS, {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES,
                                                "items": {"anyOf": [_STR, _TOKEN_IDS]}}]},
        "echo": _nullable(_BOOL),
        "logprobs": _nullable({**_INT, "minimum": 0, "maximum": MAX_LOGPROBS,
                               "description": "not together with echo"}),
        "best_of": _nullable({**_INT, "description": "must equal n"}),
        "suffix": _nullable({**_STR, "maxLength": 0, "description": "only empty"}),
    },
}
TOKENIZE_REQUEST = {
    "type": "object", "additionalProperties": False,
    "properties": {"model": _STR, "prompt": _STR, "add_special_tokens": _BOOL,
                   "messages": {"type": "array", "items": _CHAT_MESSAGE, "minItems": 1, "maxItems": MAX_MESSAGES}},
    "description": "exactly one of prompt or messages (messages get the chat template)",
}
DETOKENIZE_REQUEST = {"type": "object", "required": ["tokens"], "additionalProperties": False,
                      "properties": {"model": _STR, "tokens": {"type": "array", "items": {**_INT, "minimum": 0}}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": _STR, "type": _STR, "param": _nullable(_STR), "code": _nullable(_STR)}}}}
_ANY = {"type": "object"}
SESSION_CREATE_REQUEST = {"type": "object", "additionalProperties": False,
                          "properties": {"system": _STR, "model": _STR},
                          "description": "optional body; `system` is the session's system prompt"}
SESSION_CHAT_REQUEST = {
    "type": "object", "additionalProperties": False,
    "properties": {**{k: v for k, v in CHAT_REQUEST["properties"].items() if k != "n" and k not in _TOOLS},
                   "n": _nullable({"const": 1}),
                   "messages": {"type": "array", "minItems": 1, "description": "only the new user message(s)",
                                "items": {**_MESSAGE, "properties": {**_MESSAGE["properties"],
                                                                     "role": {"const": "user"}}}},
                   "content": {**_STR, "description": "shorthand for one new user message"}},
    "oneOf": [{"required": ["messages"]}, {"required": ["content"]}],
}
EMBEDDING_REQUEST = {
    "type": "object", "required": ["input"], "additionalProperties": False,
    "properties": {
        "model": _STR, "user": _STR,
        "input": {"anyOf": [{**_STR, "minLength": 1}, _TOKEN_IDS,
                            {"type": "array", "minItems": 1, "maxItems": 2048, "items": {**_STR, "minLength": 1}},
                            {"type": "array", "minItems": 1, "maxItems": 2048, "items": _TOKEN_IDS}],
                  "description": "each input within the context; at most 300,000 tokens in all (413)"},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "dimensions": {**_INT, "minimum": 1, "description": "at most the model's hidden size; truncates and "
                                                            "renormalizes"},
    },
    "description": "vectors pooled from the final hidden states (--embedding-pooling last|mean), L2-normalized",
}
_RESPONSE_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                  "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": _STR}}
_RESPONSE_ITEM = {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {"type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
                   "content": {"anyOf": [_STR, {"type": "array", "items": _RESPONSE_PART,
                                                "maxItems": MAX_CONTENT_PARTS}]}},
}
RESPONSES_REQUEST = {
    "type": "object", "required": ["input"], "additionalProperties": False,
    "properties": {
        "model": _STR, "user": _STR, "metadata": _nullable({"type": "object"}),
        "input": {"anyOf": [_STR, {"type": "array", "items": _RESPONSE_ITEM, "minItems": 1,
                                   "maxItems": MAX_MESSAGES}]},
        "instructions": _nullable({**_STR, "description": "the system message"}),
        "max_output_tokens": _nullable({**_INT, "minimum": 1}),
        "temperature": _NULLABLE_SAMPLING["temperature"], "top_p": _NULLABLE_SAMPLING["top_p"],
        "stream": _nullable(_BOOL),
        "store": _nullable({"const": False, "description": "stateless: nothing is stored"}),
        "previous_response_id": {"type": "null", "description": "not supported (400): nothing is stored"},
        "parallel_tool_calls": _nullable(_BOOL), "tool_choice": _nullable({"enum": ["none", "auto"]}),
        "truncation": _nullable({"const": "disabled"}),
        "text": _nullable({"type": "object", "additionalProperties": False, "properties": {"format": {"oneOf": [
            {"type": "object", "required": ["type"], "additionalProperties": False,
             "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "name"], "additionalProperties": False,
             "properties": {"type": {"const": "json_schema"}, "name": {**_STR, "minLength": 1},
                            "schema": {"type": "object"}, "strict": _BOOL, "description": _STR}}]}}}),
    },
    "description": "stateless; SSE events (response.created ... response.completed) when stream=true",
}
SESSION_REVERT_REQUEST = {"type": "object", "required": ["turn"], "additionalProperties": False,
                          "properties": {"turn": {**_INT, "minimum": 0,
                                                  "description": "keep turns 0..turn-1, drop the rest"}}}


def _op(summary: str, body: str | None = None, ok: str = "application/json", errors=(400,)) -> dict:
    op: dict = {"summary": summary, "responses": {"200": {"description": "OK", "content": {ok: {"schema": _ANY}}}}}
    # a body must come as JSON (415 otherwise: no generation from a preflight-free form post)
    for status in (*errors, 401, *((415,) if body else ())):
        op["responses"][str(status)] = {"description": "error",
                                        "content": {"application/json": {"schema": _ref("Error")}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


_GEN_ERRORS = (400, 404, 408, 413, 422, 429, 500, 503)   # 422: that request's own generation failed
_TIMEOUT_HEADER = {"name": "X-Request-Timeout", "in": "header", "required": False,
                   "schema": {**_NUM, "exclusiveMinimum": 0},
                   "description": "seconds from arrival before the request is aborted with 408 (an error "
                                  "frame when streaming); can only shorten the server's --request-timeout"}


def _generation(summary: str, body: str) -> dict:
    # 200 is application/json, or text/event-stream when stream=true
    return {**_op(summary, body, "application/json", _GEN_ERRORS), "parameters": [_TIMEOUT_HEADER]}


def _session_paths() -> dict:
    session_id = [{"name": "id", "in": "path", "required": True, "schema": _STR}]
    create = _op("Create a chat session (the server keeps the history and its KV)", "SessionCreateRequest",
                 errors=(400, 404, 413, 429))
    create["requestBody"]["required"] = False
    chat = {**_op("One turn: the new user message(s) → the reply, recorded in the session (SSE when "
                  "stream=true)", "SessionChatRequest", errors=(*_GEN_ERRORS, 409)),
            "parameters": [*session_id, _TIMEOUT_HEADER]}
    return {
        "/v1/sessions": {"post": create},
        "/v1/sessions/{id}": {"get": {**_op("The session and its turns", errors=(404,)), "parameters": session_id},
                              "delete": {**_op("Delete the session, unpinning its KV", errors=(404,)),
                                         "parameters": session_id}},
        "/v1/sessions/{id}/chat": {"post": chat},
        "/v1/sessions/{id}/revert": {"post": {**_op("Drop the turns from `turn` on", "SessionRevertRequest",
                                                    errors=(400, 404, 409, 413)), "parameters": session_id}},
    }


def build_openapi(model_name: str, version: str) -> dict:
    paths = {
        "/v1/chat/completions": {"post": _generation("Chat completion (SSE when stream=true)",
                                                     "ChatCompletionRequest")},
        "/v1/completions": {"post": _generation("Text completion (SSE when stream=true)", "CompletionRequest")},
        "/v1/embeddings": {"post": _generation("Embeddings of one or more inputs", "EmbeddingRequest")},
        "/v1/responses": {"post": _generation("Responses API, stateless (typed SSE events when stream=true)",
                                              "ResponsesRequest")},
        "/v1/models": {"get": _op("The served model", errors=())},
        "/v1/models/{model}": {"get": {**_op("One model", errors=(404,)), "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": _STR}]}},
        "/tokenize": {"post": _op("Prompt or messages → token ids", "TokenizeRequest", errors=(400, 404, 413))},
        "/detokenize": {"post": _op("Token ids → text", "DetokenizeRequest", errors=(400, 404, 413))},
        "/health": {"get": {"summary": "Liveness: 200 unless the engine loop has died (503)",
                            "responses": {"200": {"description": "alive"}, "503": {"description": "engine dead"}}}},
        "/ready": {"get": {"summary": "Readiness: 200 when the engine can serve; body has kv_blocks_in_use",
                           "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/version": {"get": _op("Server version", errors=())},
        "/metrics": {"get": _op("Prometheus exposition", ok="text/plain", errors=(404,))},
        "/openapi.json": {"get": _op("This document", errors=())},
        **_session_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": version,
                 "description": f"OpenAI-compatible server for model `{model_name}`."},
        "paths": paths,
        "components": {
            "schemas": {"ChatCompletionRequest": CHAT_REQUEST, "CompletionRequest": COMPLETION_REQUEST,
                        "TokenizeRequest": TOKENIZE_REQUEST, "DetokenizeRequest": DETOKENIZE_REQUEST,
                        "SessionCreateRequest": SESSION_CREATE_REQUEST, "SessionChatRequest": SESSION_CHAT_REQUEST,
                        "SessionRevertRequest": SESSION_REVERT_REQUEST, "Error": ERROR,
                        "EmbeddingRequest": EMBEDDING_REQUEST, "ResponsesRequest": RESPONSES_REQUEST},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
