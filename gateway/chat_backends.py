"""Chat backends for `gateway chat`, and the sampling settings they send.

Both backends offer stream(messages, settings) → an iterator of text deltas; closing it
early aborts the request. InProcessBackend renders the conversation with the model's chat
template and drives an LLM in this process (it yields "" for steps without text, so the
caller can check for Ctrl-C once per engine step). HttpBackend posts a streamed chat
completion to an OpenAI-compatible server and reads its SSE frames; closing the
connection is the abort. Failures the chat survives are ChatError."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace

import orjson

from gateway.sampling.params import SamplingParams, SamplingParamsError


class ChatError(RuntimeError):
    """A reply failed (rejected prompt, server error); the chat goes on."""


_UNSET_WORDS = ("none", "null", "")
_RESPONSE_FORMATS = {"json": "json_object", "json_object": "json_object", "text": None}
ANY_OBJECT = {"type": "object"}   # json_object's grammar, as the server's response_format has it


@dataclass(frozen=True)
class ChatSettings:
    """The sampling settings and system prompt a chat sends with every turn (`config set`)."""
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    system: str | None = None
    response_format: str | None = None   # json_object: every reply is a JSON object

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_text(self, key: str, text: str) -> "ChatSettings":
        """A copy with one setting parsed from its text; ValueError says what is wrong."""
        if key not in self.names():
            raise ValueError(f"unknown setting {key!r}; settings: {', '.join(self.names())}")
        kind = {f.name: f.type for f in fields(self)}[key]
        if "None" in kind and text.strip().lower() in _UNSET_WORDS:
            value = None
        elif key == "system":
            value = text
        elif key == "response_format":
            if text.strip().lower() not in _RESPONSE_FORMATS:
                raise ValueError(f"response_format must be json_object (or json) or text, got {text.strip()!r}")
            value = _RESPONSE_FORMATS[text.strip().lower()]
        else:
            parse = int if kind.startswith("int") else float
            try:
                value = parse(text.strip())
            except ValueError:
                value = None
            if value is None or (parse is float and not math.isfinite(value)):
                raise ValueError(f"{key} must be {'an integer' if parse is int else 'a finite number'}, "
                                 f"got {text.strip()!r}")
        candidate = replace(self, **{key: value})
        try:
            SamplingParams(**candidate.sampling_fields(max_tokens_fallback=1))
        except SamplingParamsError as exc:
            raise ValueError(str(exc)) from None
        return candidate

    def sampling_fields(self, max_tokens_fallback: int | None = None) -> dict:
        """The SamplingParams fields (max_tokens None → the fallback, or left out)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("system", "response_format")}
        if self.response_format == "json_object":
            out["json_schema"] = ANY_OBJECT
        if out["max_tokens"] is None:
            out.pop("max_tokens")
            if max_tokens_fallback is not None:
                out["max_tokens"] = max_tokens_fallback
        return out

    def non_default_fields(self) -> dict:
        """What an OpenAI server needs to hear: its own fields when set, ours when changed."""
        default, sampling = ChatSettings(), self.sampling_fields()
        sampling.pop("json_schema", None)
        out = {k: v for k, v in sampling.items() if v is not None
               and (k in ("temperature", "top_p", "max_tokens", "seed") or v != getattr(default, k))}
        if self.response_format is not None:
            out["response_format"] = {"type": self.response_format}
        return out


class InProcessBackend:
    """Replies from an LLM in this process. Interrupts are deferred to safe points."""
    defer_interrupts = True

    def __init__(self, llm):
        self.llm = llm
        self.name = llm.core.source.name

    def stream(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]:
        prompt = self.llm.encode(messages, template="chat")
        room = self.llm.core.max_model_len - len(prompt)
        if room < 1:
            raise ChatError(f"the conversation ({len(prompt)} tokens) fills the model's context "
                            f"({self.llm.core.max_model_len}); use clear or revert_to")
        sampling = settings.sampling_fields()
        sampling["max_tokens"] = min(sampling.get("max_tokens", room), room)
        return self._deltas(prompt, SamplingParams(**sampling))

    def _deltas(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        from gateway.engine.errors import RequestRejectedError
        try:
            for out in self.llm.stream(prompt, params):
                yield out.new_text   # also "" (a step without text): the loop checks for Ctrl-C per step
        except RequestRejectedError as exc:
            raise ChatError(str(exc)) from None


class HttpBackend:
    """Replies from an OpenAI-compatible server, streamed (SSE). Ctrl-C closes the connection,
    which the server treats as an abort."""
    defer_interrupts = False

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import httpx
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            self.name = model or self._first_model()
        except httpx.HTTPStatusError as exc:
            raise ValueError(f"{self.base_url}/models answered HTTP {exc.response.status_code} "
                             f"(wrong --api-key or --url?)") from None
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot reach {self.base_url}: {exc}") from None

    def _first_model(self) -> str:
        response = self.client.get("/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        if not models:
            raise ValueError(f"{self.base_url}/models lists no model; pass --model")
        return models[0]["id"]

    def stream(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]:
        body = {"model": self.name, "messages": messages, "stream": True, **settings.non_default_fields()}
        return self._deltas(body)

    def _deltas(self, body: dict) -> Iterator[str]:
        import httpx
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ChatError(_error_message(response.read(), response.status_code))
                for line in response.iter_lines():
                    text = _sse_text(line)
                    if text:
                        yield text
        except httpx.HTTPError as exc:
            raise ChatError(f"the server connection failed: {exc}") from None


def _sse_text(line: str) -> str | None:
    """The content delta of one SSE line; raises ChatError on an error frame."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    frame = orjson.loads(line[len("data: "):])
    if "error" in frame:
        raise ChatError(frame["error"].get("message", "the server reported an error"))
    choices = frame.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content")


def _error_message(raw: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {orjson.loads(raw)['error']['message']}"
    except Exception:
        return f"HTTP {status}: {raw[:300].decode('utf-8', 'replace')}"
