"""Event-loop CPU per streamed token of the API path alone: the real AsyncEngine and app
(build_app) over a stand-in EngineCore whose step sleeps (the GIL released, as torch does) and
gives every running request one token, driven at the ASGI level by C concurrent streamed
completions (no sockets, no HTTP parsing: what is measured is engine hand-off, Job, shaping
and frames). Prints the event-loop thread's CPU time (time.thread_time) per 1,000 tokens.

    python bench/api_overhead.py --concurrency 32 64 --output-len 128 --repeats 3

Runs against whichever gateway is importable (PYTHONPATH=some/tree to compare two trees):
the stand-in core offers both admission styles (add_request, check_request + admit)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace

import orjson

from gateway.api.app import build_app
from gateway.config import Config
from gateway.engine.async_engine import AsyncEngine
from gateway.engine.messages import RequestOutput


class _Tokenizer:
    chat_template = None

    def __len__(self) -> int:
        return 256

    def decode(self, ids):
        return bytes(ids).decode("latin-1")


class StandInCore:
    """What AsyncEngine touches of an EngineCore; step() sleeps step_s, one token per request."""

    def __init__(self, step_s: float):
        self.step_s, self.tokenizer, self.max_model_len = step_s, _Tokenizer(), 4096
        self.source = SimpleNamespace(name="standin")
        self.runner = SimpleNamespace(num_blocks=1024, death_listener=None, arch=SimpleNamespace(vocab_size=256))
        self.scheduler = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_free_blocks=1024,
                                         num_total_blocks=1024)
        self.requests: dict[str, list] = {}   # id → [max_tokens, produced]
        self.eos_token_ids, self.worker_pids = set(), []

    def check_health(self): pass
    def shutdown(self): pass
    def check_request(self, request): pass

    def admit(self, request):
        self.requests[request.request_id] = [request.params.max_tokens, 0]

    def add_request(self, request):
        self.admit(request)

    def abort(self, request_id):
        self.requests.pop(request_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self):
        time.sleep(self.step_s)
        outputs = []
        for rid, state in list(self.requests.items()):
            state[1] += 1
            done = state[1] >= state[0]
            if done:
                del self.requests[rid]
            outputs.append(RequestOutput(rid, [97], "a", finished=done, finish_reason="length" if done else None))
        return outputs, SimpleNamespace(num_waiting=0)


async def stream(app, output_len: int) -> int:
    body = orjson.dumps({"prompt": [1, 2, 3], "max_tokens": output_len, "stream": True,
                         "stream_options": {"include_usage": True}})
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()
    tokens = 0

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):   # kept light: it runs on the measured loop too
        nonlocal tokens
        chunk = message.get("body", b"")
        if b'"usage":{' in chunk:
            for line in chunk.split(b"\n\n"):
                if b'"usage":{' in line:
                    tokens = orjson.loads(line[len(b"data: "):])["usage"]["completion_tokens"]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    gone.set()
    return tokens


async def measure(concurrency: int, output_len: int, step_s: float) -> tuple[float, int]:
    engine = AsyncEngine(Config(model="standin"), StandInCore(step_s))
    app = build_app(engine, Config(model="standin"))
    await engine.start()
    while not engine.is_ready():
        await asyncio.sleep(0.01)
    cpu0 = time.thread_time()
    tokens = sum(await asyncio.gather(*(stream(app, output_len) for _ in range(concurrency))))
    cpu = time.thread_time() - cpu0
    await engine.shutdown()
    return 1e6 * cpu / tokens, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=20.0, help="the stand-in step's sleep")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for c in args.concurrency:
        runs = [asyncio.run(measure(c, args.output_len, args.step_ms / 1e3)) for _ in range(args.repeats)]
        values = [ms for ms, _ in runs]
        print(f"{c} streams x {args.output_len} tokens ({runs[0][1]} streamed): event loop "
              f"{statistics.median(values):.1f} ms CPU per 1,000 tokens (runs: "
              + ", ".join(f"{v:.1f}" for v in values) + ")", flush=True)


if __name__ == "__main__":
    main()
