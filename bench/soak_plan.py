"""The soak run's requests (a seeded plan) and the client that sends one and judges the outcome.

The plan opens with PRESSURE_BURST "pressure" completions that bench/soak.py sends together
before anything else: 160-token prompts (10 blocks of 16) growing by 64 tokens each. They are
more than the soak server admits (at most 8 may wait to be scheduled, --max-waiting-requests 8),
so 429s are certain, and any five of them need 70 blocks of its 64, so preemption is certain.

Kinds, with their share of the rest of the plan and the outcome each must have:
  completion 36%, chat 30%  valid; 200 and finished (a 429 is retried after Retry-After, up to
                            MAX_429_RETRIES times; a client that still gets 429 gives up, which
                            counts as a refusal, not a loss: n=2 requests need two free slots
                            at once and can be outrun by n=1 requests on a saturated server;
                            the same holds for the pressure burst, whose last requests can wait
                            out their retries behind the first ones on a loaded 2-core box)
  drop 10%                  a stream the client closes after 1-4 frames (or that ends first)
  deadline 4%               X-Request-Timeout 0.05-0.5 s: finished, 408, or a request_timeout frame
  bad_json, unknown_param, too_long (prompt 520-700 tokens), bad_logit_bias 5% each: 400
  extreme (0% here)         sampling values at or past their limits (repetition_penalty 1e-46
                            or 1e39, temperature 1e39 with min_tokens, penalty and logit_bias
                            extremes, top_p 1e-46, ...): 200 and finished, or 400; never 5xx
MIXES holds other shares by name: "issue21" is the 30-minute soak's mix (10% dropped streams,
2% malformed bodies, 1% extreme parameters, the rest valid). iter_plan() yields a plan without
end (for soak.py --duration); build_plan() takes its first num_requests.
Completion prompts are token ids of exact lengths (short 8-48, medium 64-192, long 256-440),
chat prompts are words; max_tokens 4-32, so nothing valid exceeds --max-model-len 512.
No side effects beyond the HTTP requests themselves."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson

MAX_429_RETRIES = 120
PRESSURE_BURST = 34
SERVER_ERROR_TYPES = {"InternalServerError", "ServiceUnavailableError"}
KINDS = {"completion": 36, "chat": 30, "drop": 10, "deadline": 4,
         "bad_json": 5, "unknown_param": 5, "too_long": 5, "bad_logit_bias": 5}
MIXES = {"default": KINDS,
         "issue21": {"completion": 45, "chat": 40, "drop": 10, "bad_json": 2, "extreme": 1},
         "extreme": {"completion": 50, "extreme": 50}}
# One or two of these per extreme request. In range (200 expected) and out of range (400
# naming the field): the values that overflowed float32 and once killed the engine included.
EXTREMES = {
    "repetition_penalty": [1e-46, 1e39, 0.01, 100, 0, -1],
    "temperature": [1e39, 100, 1e-46, 0, -1e-46],
    "frequency_penalty": [-2, 2, 1e39, -1e39, 1e-46],
    "presence_penalty": [-2, 2, 1e39, -1e39, 1e-46],
    "top_p": [1e-46, 1, 0, 1e39],
    "min_p": [0, 1, 1e-46, 1e39],
    "top_k": [1, -1, 2**62, -(2**62)],
    "logit_bias": [{"5": 100}, {"5": -100, "6": 100}, {"5": 1e39}, {"5": -1e39}, {"5": 1e-46}],
    "seed": [2**63 - 200, -(2**63), 2**63],
}
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches near old rivers under bright autumn stars and distant mountains").split()


@dataclass
class Item:
    kind: str
    path: str
    body: dict | None = None
    raw: bytes | None = None          # sent as is instead of body (malformed JSON)
    stream: bool = False
    headers: dict = field(default_factory=dict)
    drop_after: int | None = None     # frames received before the client hangs up


@dataclass
class Result:
    kind: str
    status: int | str = "no answer"
    outcome: str = "lost"             # completed | dropped | rejected | error_frame | lost
    frame_error: str | None = None    # the code of an error frame inside a 200 stream
    frame_error_type: str | None = None
    throttled: int = 0                # 429 answers retried
    tokens: int = 0
    detail: str = ""

    @property
    def deadline_expired(self) -> bool:
        return self.status == 408 or self.frame_error == "request_timeout"

    @property
    def server_error(self) -> bool:
        return (isinstance(self.status, int) and self.status >= 500) or self.frame_error_type in SERVER_ERROR_TYPES

    @property
    def gave_up(self) -> bool:
        return self.status == 429

    @property
    def as_expected(self) -> bool:
        if self.gave_up and self.kind in ("pressure", "completion", "chat", "drop", "deadline"):
            return True   # refused politely: a full queue answers 429 for as long as it stays full
        if self.kind in ("completion", "chat", "pressure"):
            return self.status == 200 and self.outcome == "completed"
        if self.kind == "drop":
            return self.status == 200 and self.outcome in ("dropped", "completed")
        if self.kind == "deadline":
            return self.status == 408 or (self.status == 200 and (self.outcome == "completed"
                                                                 or self.frame_error == "request_timeout"))
        if self.kind == "extreme":
            return self.status == 400 or (self.status == 200 and self.outcome == "completed")
        return self.status == 400


def _completion(rng: random.Random, length: int | None = None) -> dict:
    if length is None:
        length = rng.choice([rng.randint(8, 48)] * 10 + [rng.randint(64, 192)] * 7 + [rng.randint(256, 440)] * 3)
    return {"prompt": [rng.randrange(100, 20000) for _ in range(length)], "max_tokens": rng.randint(4, 32),
            "ignore_eos": rng.random() < 0.5, "temperature": rng.choice([0.0, 0.8]),
            "n": 2 if rng.random() < 0.1 else 1}


def _chat(rng: random.Random) -> dict:
    words = rng.randint(3, 30) if rng.random() < 0.6 else rng.randint(40, 150)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(4, 32),
            "temperature": rng.choice([0.0, 0.8])}


def _valid(kind: str, rng: random.Random, stream: bool) -> Item:
    if kind == "chat" or (kind != "completion" and rng.random() < 0.5):
        item = Item(kind, "/v1/chat/completions", _chat(rng), stream=stream)
    else:
        item = Item(kind, "/v1/completions", _completion(rng), stream=stream)
    if stream:
        item.body["stream_options"] = {"include_usage": True}
    return item


def _invalid(kind: str, rng: random.Random) -> Item:
    body = _completion(rng, length=rng.randint(8, 32))
    if kind == "bad_json":
        raw = rng.choice([b'{"prompt": [1, 2', b"[1, 2, 3]", b"\xff\xfe{}", b"", b'{"prompt": "x",}'])
        return Item(kind, "/v1/completions", raw=raw)
    if kind == "unknown_param":
        body[rng.choice(["frobnicate", "tools", "best_of_luck"])] = [1]
    elif kind == "too_long":
        body = _completion(rng, length=rng.randint(520, 700))
    else:
        body["logit_bias"] = rng.choice([{"99999999": 1}, {"abc": 1}, {"5": 1000}, {"-1": 1}])
    return Item(kind, "/v1/completions", body, stream=rng.random() < 0.3)


def _extreme(rng: random.Random) -> Item:
    """A valid chat or completion request with one or two sampling fields at an extreme;
    temperature 1e39 comes with min_tokens 2 (finding 8's variant)."""
    item = _valid("extreme", rng, stream=rng.random() < 0.5)
    for name in rng.sample(sorted(EXTREMES), rng.choice([1, 2])):
        item.body[name] = rng.choice(EXTREMES[name])
        if name == "temperature" and item.body[name] == 1e39:
            item.body["min_tokens"] = min(2, item.body["max_tokens"])
    return item


def _pressure(rng: random.Random) -> Item:
    body = {"prompt": [rng.randrange(100, 20000) for _ in range(160)], "max_tokens": 64,
            "ignore_eos": True, "temperature": 0.0}
    return Item("pressure", "/v1/completions", body)


def _item(kind: str, rng: random.Random) -> Item:
    if kind in ("completion", "chat"):
        return _valid(kind, rng, stream=rng.random() < 0.5)
    if kind == "drop":
        item = _valid(kind, rng, stream=True)
        item.body["max_tokens"] = rng.randint(16, 32)
        item.drop_after = rng.randint(1, 4)
        return item
    if kind == "deadline":
        item = _valid(kind, rng, stream=rng.random() < 0.5)
        item.body["max_tokens"] = 32
        item.headers["X-Request-Timeout"] = f"{rng.uniform(0.05, 0.5):.3f}"
        return item
    if kind == "extreme":
        return _extreme(rng)
    return _invalid(kind, rng)


def iter_plan(seed: int = 0, kinds: dict[str, float] | None = None, burst: int = PRESSURE_BURST) -> Iterator[Item]:
    """burst pressure items, then items of `kinds` (default KINDS) drawn by weight, forever."""
    kinds = KINDS if kinds is None else kinds
    rng = random.Random(seed)
    for _ in range(burst):
        yield _pressure(rng)
    names, weights = list(kinds), list(kinds.values())
    while True:
        yield _item(rng.choices(names, weights=weights)[0], rng)


def build_plan(num_requests: int, seed: int = 0, kinds: dict[str, float] | None = None) -> list[Item]:
    """PRESSURE_BURST pressure items first (fewer if the plan is shorter), then the mix of KINDS."""
    if kinds is None or kinds is KINDS:   # the draws the default plan has always had (one choices() call)
        rng = random.Random(seed)
        plan = [_pressure(rng) for _ in range(min(PRESSURE_BURST, num_requests))]
        kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=num_requests - len(plan))
        return plan + [_item(kind, rng) for kind in kinds]
    return list(itertools.islice(iter_plan(seed, kinds, min(PRESSURE_BURST, num_requests)), num_requests))


async def _plain(client: httpx.AsyncClient, item: Item, result: Result, content: bytes,
                 headers: dict) -> httpx.Response:
    response = await client.post(item.path, content=content, headers=headers)
    result.status = response.status_code
    if response.status_code != 200:
        result.outcome, result.detail = "rejected", response.text
        return response
    data = response.json()
    result.tokens = data["usage"]["completion_tokens"]
    finished = all(choice.get("finish_reason") for choice in data["choices"])
    result.outcome = "completed" if finished and data["choices"] else "lost"
    return response


def _read_frame(obj: dict, result: Result, finished: set) -> None:
    if "error" in obj:
        result.frame_error = obj["error"].get("code") or obj["error"].get("type")
        result.frame_error_type, result.detail = obj["error"].get("type"), obj["error"].get("message", "")
        return
    finished.update(c["index"] for c in obj.get("choices", []) if c.get("finish_reason"))
    if obj.get("usage"):
        result.tokens = obj["usage"]["completion_tokens"]


async def _stream(client: httpx.AsyncClient, item: Item, result: Result, content: bytes,
                  headers: dict) -> httpx.Response:
    async with client.stream("POST", item.path, content=content, headers=headers) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.outcome, result.detail = "rejected", (await response.aread()).decode(errors="replace")
            return response
        frames, done, finished = 0, False, set()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            frames += 1
            _read_frame(orjson.loads(line[len("data: "):]), result, finished)
            if item.drop_after is not None and frames >= item.drop_after:
                result.outcome = "dropped"   # leaving the block closes the connection mid-stream
                return response
        n = item.body.get("n", 1) if item.body else 1
        if done and result.frame_error:
            result.outcome = "error_frame"
        elif done and len(finished) == n:
            result.outcome = "completed"
        else:
            result.outcome, result.detail = "lost", f"stream ended after {frames} frames without [DONE]"
        return response


async def run_one(client: httpx.AsyncClient, item: Item) -> Result:
    """Send one item (retrying 429s after Retry-After) and judge what came back."""
    result = Result(item.kind)
    content = item.raw if item.raw is not None else orjson.dumps({**item.body, "stream": item.stream})
    headers = {"content-type": "application/json", **item.headers}
    send = _stream if item.stream else _plain
    for _ in range(MAX_429_RETRIES + 1):
        result.status, result.outcome, result.frame_error = "no answer", "lost", None
        try:
            response = await send(client, item, result, content, headers)
        except (httpx.TransportError, ValueError) as exc:   # broken connection, timeout, bad JSON frame
            result.outcome, result.detail = "lost", f"{type(exc).__name__}: {exc}"
            return result
        if response.status_code != 429:
            return result
        result.throttled += 1
        await asyncio.sleep(float(response.headers.get("retry-after", "1")) * random.uniform(1.0, 1.5))
    return result
