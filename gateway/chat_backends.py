"""Chat backends for `gateway chat`, and the sampling settings they send.

Both backends offer stream(messages, settings) → an iterator of text deltas; closing it
early aborts the request. InProcessBackend renders the conversation with the model's chat
template and drives an LLM in this process (it yields "" for steps without text, so the
caller can check for Ctrl-C once per engine step). HttpBackend posts a streamed chat
completion to an OpenAI-compatible server and reads its SSE frames; closing the
connection is the abort. Failures the chat survives are ChatError."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from gateway.sampling.params import SamplingParams

# setting → parser of its text value; "none" unsets the nullable ones
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int,
            "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
            "seed": int, "system": str}
NULLABLE = {"max_tokens", "seed", "system"}
DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": None,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": None,
            "system": None}


class ChatError(RuntimeError):
    """A reply failed (rejected prompt, server error); the chat goes on."""


def sampling_fields(settings: dict, max_tokens_fallback: int | None = None) -> dict:
    """The settings that are SamplingParams fields (max_tokens None → the fallback, or left out)."""
    fields = {k: v for k, v in settings.items() if k != "system"}
    if fields["max_tokens"] is None:
        fields.pop("max_tokens")
        if max_tokens_fallback is not None:
            fields["max_tokens"] = max_tokens_fallback
    return fields


class InProcessBackend:
    """Replies from an LLM in this process. Interrupts are deferred to safe points."""
    defer_interrupts = True

    def __init__(self, llm):
        self.llm = llm
        self.name = llm.core.source.name

    def stream(self, messages: list[dict], settings: dict) -> Iterator[str]:
        prompt = self.llm.encode(messages, template="chat")
        room = self.llm.core.max_model_len - len(prompt)
        if room < 1:
            raise ChatError(f"the conversation ({len(prompt)} tokens) fills the model's context "
                            f"({self.llm.core.max_model_len}); use clear or revert_to")
        fields = sampling_fields(settings)
        fields["max_tokens"] = min(fields.get("max_tokens", room), room)
        return self._deltas(prompt, SamplingParams(**fields))

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

    def stream(self, messages: list[dict], settings: dict) -> Iterator[str]:
        body = {"model": self.name, "messages": messages, "stream": True}
        body.update({k: v for k, v in sampling_fields(settings).items()   # non-OpenAI fields only when set
                     if v is not None and (k in ("temperature", "top_p", "max_tokens", "seed") or v != DEFAULTS[k])})
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
