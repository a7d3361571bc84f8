"""One streamed request against an OpenAI-compatible server, timed chunk by chunk.

send_request posts a chat or completions request with stream=true and
stream_options.include_usage, reads the SSE stream line by line and records: the time of
every chunk that carries generated text (the first gives TTFT, the gaps give ITL), the
usage chunk's prompt/completion token counts, and the end of the stream (E2E latency).
It never raises for a failed request: the failure is returned in RequestOutput.error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from serve_datasets import SampleRequest


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    start_time: float = 0.0        # perf_counter when the request was sent
    latency: float = 0.0           # seconds until the stream ended
    ttft: float = 0.0              # seconds until the first text-bearing chunk
    itl: list[float] = field(default_factory=list)   # gaps between text-bearing chunks
    chunk_times: list[float] = field(default_factory=list)   # offsets from start_time
    prompt_len: int = 0            # usage.prompt_tokens (the dataset estimate if absent)
    output_tokens: int = 0         # usage.completion_tokens (chunk count if absent)
    generated_text: str = ""


def build_payload(endpoint_type: str, model: str, sample: SampleRequest, ignore_eos: bool,
                  extra_body: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "max_tokens": sample.expected_output_len,
                               "stream": True, "stream_options": {"include_usage": True}}
    if endpoint_type == "chat":
        messages = sample.prompt if isinstance(sample.prompt, list) else [
            {"role": "user", "content": sample.prompt}]
        payload["messages"] = messages
    else:
        payload["prompt"] = sample.prompt if isinstance(sample.prompt, str) else "\n".join(
            f"{m.get('role', 'user')}: {m.get('content', '')}" for m in sample.prompt)
    if ignore_eos:
        # Both, so that every output is exactly max_tokens long on vLLM-like servers.
        payload["ignore_eos"] = True
        payload["min_tokens"] = sample.expected_output_len
    payload.update(extra_body)
    return payload


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    first = choices[0]
    delta = first.get("delta")
    if delta is not None:   # chat
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return first.get("text") or ""


class _Stream:
    """Accumulates one response's SSE chunks into a RequestOutput."""

    def __init__(self, out: RequestOutput):
        self.out = out
        self.last = out.start_time
        self.usage: dict[str, Any] | None = None
        self.texts: list[str] = []

    def feed(self, line: str) -> bool:
        """Returns False once [DONE] is seen."""
        if not line.startswith("data:"):
            return True   # blank separators, comments, event: lines
        data = line[5:].strip()
        if data == "[DONE]":
            return False
        chunk = orjson.loads(data)
        if chunk.get("error"):
            raise RuntimeError(f"error chunk: {chunk['error']}")
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = _chunk_text(chunk)
        if text:
            now = time.perf_counter()
            if not self.texts:
                self.out.ttft = now - self.out.start_time
            else:
                self.out.itl.append(now - self.last)
            self.out.chunk_times.append(now - self.out.start_time)
            self.last = now
            self.texts.append(text)
        return True

    def finish(self, sample: SampleRequest) -> None:
        out = self.out
        out.latency = time.perf_counter() - out.start_time
        out.generated_text = "".join(self.texts)
        usage = self.usage or {}
        out.prompt_len = int(usage.get("prompt_tokens") or sample.prompt_len)
        # Without a usage chunk, one chunk ≈ one token (what most servers stream).
        out.output_tokens = int(usage.get("completion_tokens") or len(self.texts))
        out.success = True


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                       sample: SampleRequest, headers: dict[str, str]) -> RequestOutput:
    out = RequestOutput(start_time=time.perf_counter())
    stream = _Stream(out)
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                out.error = f"HTTP {response.status_code}: {body[:500]}"
                return out
            async for line in response.aiter_lines():
                if not stream.feed(line):
                    break
        stream.finish(sample)
    except Exception as exc:   # a failed request is data, not a crash of the benchmark
        out.success = False
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def first_model_id(client: httpx.AsyncClient, base_url: str,
                         headers: dict[str, str]) -> str:
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no models; pass --model")
    return data[0]["id"]
