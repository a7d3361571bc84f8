"""OpenAI wire format: request bodies → typed requests, engine results → response objects.

Parsing is pure (no engine calls, no I/O) and happens in two steps:
1. `parse_chat` / `parse_completion` check every field's type and range, bound every list's
   length (MAX_* below; a 400 naming the field and the limit, before any per-item work) and
   reject every field we do not implement (400 naming it: nothing is accepted-and-ignored), returning a ChatRequest
   / CompletionRequest that holds an already-validated SamplingParams template.
2. `finalize_params`, called after tokenization, fixes the per-choice max_tokens (by default
   the rest of the context window) and seed; whether they fit is the engine's admission check.
The exact OpenAI response, chunk and logprobs objects are built in responses.py; structured
output (`response_format`, `guided_*`, `structured_outputs`) is parsed in structured.py, tool calling (`tools`,
`tool_choice`, `parallel_tool_calls`, tool messages) in tools.py.

Accepted although they change nothing we compute: `user`, `metadata` (bookkeeping tags) and
`store` (false only: we store nothing). A field in UNSUPPORTED may be sent as null.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gateway.api import structured, tools
from gateway.api.errors import invalid, model_not_found
from gateway.sampling.params import SamplingParams, SamplingParamsError

MAX_CHOICES = 128        # n, times the number of prompts for completions
MAX_STOP = 16
MAX_LOGPROBS = 20
INT64 = 2**63
# Bounds on every list a request carries. Each entry costs work on the event loop (parsing,
# templating) or in every engine step (stop ids and biases are rebuilt per step), so an
# unbounded list let one request stall the server or slow every other stream.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256      # per message
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300         # OpenAI's limit

# body field → JSON type; each maps 1:1 onto the SamplingParams attribute of the same name
SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "top_k": "integer", "min_p": "number",
    "presence_penalty": "number", "frequency_penalty": "number", "repetition_penalty": "number",
    "seed": "integer", "min_tokens": "integer", "ignore_eos": "boolean", "skip_special_tokens": "boolean",
}
_COMMON = {"model", "max_tokens", "n", "stream", "stream_options", "stop", "stop_token_ids",
           "logit_bias", "user", "metadata", "store", *SAMPLING_FIELDS, *structured.FIELDS}
CHAT_FIELDS = frozenset(_COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", *tools.FIELDS})
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"})
UNSUPPORTED = frozenset({
    "functions", "function_call",
    "audio", "modalities", "prediction", "logits_processors", "web_search_options", "reasoning_effort",
    "service_tier",
    "verbosity",
})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
               dict: "object", type(None): "null"}
_CHECKS = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool), "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_model_len: int
    tool_format: str = tools.HERMES   # the chat template's tool-call format (tool_formats.detect)


@dataclass
class GenerationRequest:
    params: SamplingParams          # template: max_tokens and seed are fixed per choice later
    max_tokens: int | None          # as requested; None → the rest of the context window
    n: int
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict]            # [{"role", "content": str, + tools.MESSAGE_FIELDS}], roles normalized
    tools: tools.ToolSpec | None = None   # tools / tool_choice / parallel_tool_calls, when sent


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]]  # text or token ids, one entry per prompt
    echo: bool


def get(body: dict, name: str, kind: str, default=None):
    """body[name] checked against a JSON type; null and absent both mean `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not _CHECKS[kind](value):
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise invalid(name, f"`{name}` must be of type {kind}, not {got}", code="invalid_type")
    return float(value) if kind == "number" else value


def _reject_unknown(body: dict, allowed: frozenset) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in UNSUPPORTED:
            if value is None:
                continue
            raise invalid(key, f"`{key}` is not supported by this server", code="unsupported_parameter")
        raise invalid(key, f"Unrecognized request argument supplied: {key}", code="unknown_parameter")


def bounded(value, param: str, limit: int):
    """value (a list or object) unless it holds more than `limit` items: a 400 naming both."""
    if len(value) <= limit:
        return value
    if isinstance(value, dict):
        raise invalid(param, f"Invalid `{param}`: too many entries. Expected at most {limit} entries, "
                             f"but got {len(value)}.", code="object_above_max_size")
    raise invalid(param, f"Invalid `{param}`: array too long. Expected an array with maximum length {limit}, "
                         f"but got an array with length {len(value)} instead.", code="array_above_max_length")


def _is_id(t, vocab_size: int) -> bool:
    return type(t) is int and 0 <= t < vocab_size   # `type is`: JSON true is not a token id


def check_ids(ids: list, param: str, vocab_size: int) -> list[int]:
    if not all(_is_id(t, vocab_size) for t in ids):   # one C-level pass: prompts can be long
        bad = next(t for t in ids if not _is_id(t, vocab_size))
        raise invalid(param, f"`{param}` must hold token ids in [0, {vocab_size}), got {bad!r}")
    return ids


def _stops(body: dict, info: ModelInfo) -> tuple[list[str], list[int]]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else get(body, "stop", "array", [])
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", f"`stop` must be a non-empty string or at most {MAX_STOP} of them")
    ids = bounded(get(body, "stop_token_ids", "array", []), "stop_token_ids", MAX_STOP_TOKEN_IDS)
    ids = check_ids(ids, "stop_token_ids", info.vocab_size)
    return stop, ids


def _logit_bias(body: dict, info: ModelInfo) -> dict[int, float]:
    bias = {}
    for key, value in bounded(get(body, "logit_bias", "object", {}), "logit_bias", MAX_LOGIT_BIAS).items():
        if not (key.isascii() and key.isdigit()):   # int() would also take "+5", " 5", "5_0"
            raise invalid("logit_bias", f"`logit_bias` keys must be token ids, got {key!r}")
        token = int(key)
        if not 0 <= token < info.vocab_size or not _CHECKS["number"](value):
            raise invalid("logit_bias", f"`logit_bias` {key!r}: ids must be in [0, {info.vocab_size}) "
                                        "with numeric biases")
        bias[token] = float(value)
    return bias


def _common(body: dict, info: ModelInfo, logprobs: int | None, max_tokens: int | None,
            rename: dict[str, str], tool_grammar: str | None = None) -> dict:
    """Fields shared by both endpoints → GenerationRequest keyword arguments. tool_grammar: the
    grammar active tools impose (chat), which no other structured-output field may join."""
    model = get(body, "model", "string")
    if model is not None and model != info.name:
        raise model_not_found(model)
    n = get(body, "n", "integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise invalid("n", f"`n` must be in [1, {MAX_CHOICES}]")
    stream = get(body, "stream", "boolean", False)
    options = get(body, "stream_options", "object")
    if options is not None and (not stream or set(options) - {"include_usage"}):
        raise invalid("stream_options", "`stream_options` takes only include_usage, and only with stream=true")
    get(body, "user", "string")
    get(body, "metadata", "object")
    if get(body, "store", "boolean", False):
        raise invalid("store", "`store=true` is not supported: this server stores nothing")
    kwargs = {name: get(body, name, kind) for name, kind in SAMPLING_FIELDS.items() if body.get(name) is not None}
    if kwargs.get("top_k", 0) < -1:
        raise invalid("top_k", "`top_k` must be -1 (or 0) to disable, or a positive integer")
    if not -INT64 <= kwargs.get("seed", 0) < INT64 - MAX_CHOICES:
        raise invalid("seed", "`seed` must be a signed 64-bit integer")
    kwargs["stop"], kwargs["stop_token_ids"] = _stops(body, info)
    kwargs["logit_bias"] = _logit_bias(body, info)
    constraint, source = structured.parse(body)
    if tool_grammar is not None:
        if source is not None:
            raise invalid(source, f"`{source}` cannot be combined with tool calling (`tools` with `tool_choice` "
                                  "other than \"none\")")
        constraint, source = {"grammar": tool_grammar}, "tools"
    kwargs.update(constraint)
    rename = {name: source for name in ("json_schema", "regex", "grammar", "choice")} | rename
    try:   # validate now so range errors need no tokenization; max_tokens is re-checked later
        limit = info.max_model_len if max_tokens is None else max_tokens
        params = SamplingParams(max_tokens=limit, logprobs=logprobs, **kwargs)
    except SamplingParamsError as exc:
        raise invalid(rename.get(exc.param, exc.param), str(exc)) from None
    include_usage = (options or {}).get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage", "`include_usage` must be a boolean", code="invalid_type")
    return dict(params=params, max_tokens=max_tokens, n=n, stream=stream, include_usage=include_usage)


def _message(i: int, m) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(where, f"`{where}` must be an object")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:   # an unhashable role must not reach `in`
        raise invalid(f"{where}.role", f"`{where}.role` must be one of {sorted(ROLES)}, got {role!r}")
    extra = set(m) - {"role", "content"} - tools.MESSAGE_FIELDS.get(role, set())
    if extra:
        raise invalid(f"{where}.{sorted(extra)[0]}", f"`{where}` has unsupported fields {sorted(extra)}")
    fields = tools.message_fields(where, role, m)
    content = m.get("content")
    if content is None and "tool_calls" in fields:   # an assistant turn that only called tools
        content = ""
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content, **fields}
    if not isinstance(content, list):
        raise invalid(f"{where}.content", f"`{where}.content` must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(bounded(content, f"{where}.content", MAX_CONTENT_PARTS)):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise invalid(f"{where}.content[{j}]", f"content part type {kind!r} is not supported "
                                                    "(only {\"type\": \"text\", \"text\": ...})")
        texts.append(part["text"])
    return {"role": ROLES[role], "content": "\n".join(texts), **fields}


def parse_messages(body: dict) -> list[dict]:
    messages = get(body, "messages", "array")
    if not messages:
        raise invalid("messages", "`messages` must be a non-empty array")
    bounded(messages, "messages", MAX_MESSAGES)
    return [_message(i, m) for i, m in enumerate(messages)]


def parse_chat(body: dict, info: ModelInfo) -> ChatRequest:
    _reject_unknown(body, CHAT_FIELDS)
    messages = parse_messages(body)
    max_tokens = get(body, "max_completion_tokens", "integer")
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", "integer")
    elif body.get("max_tokens") not in (None, max_tokens):
        raise invalid("max_tokens", "`max_tokens` and `max_completion_tokens` disagree; send one")
    top = get(body, "top_logprobs", "integer")
    want = get(body, "logprobs", "boolean", False)
    if top is not None and (not want or not 0 <= top <= MAX_LOGPROBS):
        raise invalid("top_logprobs", f"`top_logprobs` must be in [0, {MAX_LOGPROBS}] with logprobs=true")
    rename = {"max_tokens": "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"}
    spec = tools.parse_tools(body, info.tool_format)
    grammar = spec.grammar() if spec is not None else None
    common = _common(body, info, (top or 0) if want else None, max_tokens, rename, grammar)
    return ChatRequest(messages=messages, tools=spec, **common)


def _prompts(value, info: ModelInfo) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise invalid("prompt", "`prompt` must be a string, an array of token ids, or an array of those")
    if all(type(t) is int for t in value):
        return [_token_prompt(value, info)]
    prompts: list[str | list[int]] = []
    for item in bounded(value, "prompt", MAX_CHOICES):   # each prompt is at least one choice
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item:
            prompts.append(_token_prompt(item, info))
        else:
            raise invalid("prompt", "each prompt must be a string or a non-empty array of token ids")
    return prompts


def _token_prompt(ids: list, info: ModelInfo) -> list[int]:
    if len(ids) > info.max_model_len:   # cannot fit whatever max_tokens is: no need to check each id
        raise invalid("prompt", f"This model's maximum context length is {info.max_model_len} tokens, "
                                f"but the prompt has {len(ids)} tokens.", code="context_length_exceeded")
    return check_ids(ids, "prompt", info.vocab_size)


def parse_completion(body: dict, info: ModelInfo) -> CompletionRequest:
    _reject_unknown(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise invalid("prompt", "`prompt` is required")
    prompts = _prompts(body["prompt"], info)
    logprobs = get(body, "logprobs", "integer")
    echo = get(body, "echo", "boolean", False)
    if echo and logprobs is not None:
        raise invalid("echo", "`echo` with `logprobs` needs prompt logprobs, which this server does not compute")
    if get(body, "suffix", "string"):
        raise invalid("suffix", "`suffix` is not supported by this server", code="unsupported_parameter")
    common = _common(body, info, logprobs, get(body, "max_tokens", "integer"), {})
    if get(body, "best_of", "integer", common["n"]) != common["n"]:
        raise invalid("best_of", "`best_of` must equal n: this server does not rank candidates")
    if common["n"] * len(prompts) > MAX_CHOICES:
        raise invalid("prompt", f"n times the number of prompts must be at most {MAX_CHOICES}")
    return CompletionRequest(prompts=prompts, echo=echo, **common)


def finalize_params(req: GenerationRequest, choice: int, prompt_len: int, info: ModelInfo,
                    prompt_param: str) -> SamplingParams:
    """The SamplingParams of one choice: max_tokens (left unset: the rest of the context, at
    least 1), seed + choice. Whether prompt + max_tokens fits the context is the engine's one
    check at admission (EngineCore.check_request), not repeated here."""
    if prompt_len == 0:
        raise invalid(prompt_param, "the prompt is empty (0 tokens)")
    max_tokens = req.max_tokens if req.max_tokens is not None else max(info.max_model_len - prompt_len, 1)
    seed = None if req.params.seed is None else req.params.seed + choice
    try:
        return dataclasses.replace(req.params, max_tokens=max_tokens, seed=seed)
    except SamplingParamsError as exc:   # e.g. min_tokens above the default max_tokens
        raise invalid(exc.param, str(exc)) from None
