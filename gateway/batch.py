"""`gateway batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI batch file run through the offline engine
(engine/llm.py) at full batch, no server.

Input lines: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" |
"/v1/embeddings", "body": {...}}. Output lines, appended and flushed as each request ends (so a
killed run loses only what was in flight): {"id", "custom_id", "response": {"status_code": 200,
"request_id", "body": <the object the server would answer>}, "error": null}; a bad request (bad
JSON, unknown url, a body the server would refuse, a request that fails in the engine) gets one
line with its status and the server's error body, plus "error": {"code", "message"}, and the
file goes on. A line without a readable custom_id is recorded as custom_id null with its "line"
number.

Order: read OUTPUT (if any) and skip every custom_id (and id-less line number) already there
→ parse each remaining line (protocol.py, the server's own checks) → keep up to WINDOW requests
in the engine at once, stepping it and writing each request's line when all its choices ended
→ a tqdm bar counts the lines."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from gateway.api import protocol as P
from gateway.api import shapers
from gateway.api.embeddings import parse_body as parse_embeddings, shape_vector
from gateway.api.errors import APIError, from_exception, invalid
from gateway.api.streaming import ChoiceState
from gateway.config import Config
from gateway.engine.errors import RequestRejectedError
from gateway.engine.llm import LLM
from gateway.engine.messages import EngineRequest
from gateway.sampling.params import SamplingParams

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW_PER_SEQ = 4   # requests in the engine per --max-num-seqs slot: the scheduler always has a queue


@dataclass
class Pending:
    custom_id: str
    url: str
    ctx: shapers.ResponseContext | None
    states: list[ChoiceState]
    open: int
    embed: tuple | None = None          # (encoding, dimensions) for /v1/embeddings
    ids: list[str] = field(default_factory=list)


def done_keys(output: Path) -> set:
    """custom_ids (and ("line", n) for id-less lines) already answered in OUTPUT."""
    keys: set = set()
    if not output.exists():
        return keys
    for raw in output.read_bytes().splitlines():
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError:   # a line cut by a crash: that request runs again
            continue
        keys.add(row["custom_id"] if row.get("custom_id") is not None else ("line", row.get("line")))
    return keys


class BatchRunner:
    def __init__(self, llm: LLM, out, bar=None):
        self.llm, self.out, self.bar = llm, out, bar
        core = llm.core
        self.info = P.ModelInfo(llm.config.served_model_name or core.source.name, len(core.tokenizer),
                                core.max_model_len)
        self.template = llm.config.chat_template and Path(llm.config.chat_template).read_text()
        self.pending: dict[str, Pending] = {}      # engine request id → its batch request
        self.counts = {"ok": 0, "error": 0, "skipped": 0}

    # ---- output lines --------------------------------------------------------------------
    def _write(self, row: dict) -> None:
        self.out.write(orjson.dumps(row) + b"\n")
        self.out.flush()
        if self.bar is not None:
            self.bar.update(1)

    def write_ok(self, custom_id: str, body: dict) -> None:
        self.counts["ok"] += 1
        self._write({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "error": None,
                     "response": {"status_code": 200, "request_id": body.get("id"), "body": body}})

    def write_error(self, custom_id: str | None, error: APIError, line: int) -> None:
        self.counts["error"] += 1
        row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
               "response": {"status_code": error.status, "request_id": None, "body": error.body()},
               "error": {"code": error.code or error.type, "message": error.message}}
        if custom_id is None:
            row["line"] = line
        self._write(row)

    # ---- one input line ------------------------------------------------------------------
    def submit(self, custom_id: str, url: str, body: dict) -> None:
        """Parse and queue one request; raises APIError for what the server would refuse."""
        if url == "/v1/embeddings":
            return self._submit_embeddings(custom_id, body)
        if url == "/v1/chat/completions":
            req = P.parse_chat(body, self.info)
            prompts, param = [self._encode_chat(req.messages)], "messages"
        else:
            req = P.parse_completion(body, self.info)
            prompts = [self.llm.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
            param = "prompt"
            if req.echo:
                raise invalid("echo", "`echo` is not supported in batch files")
        if req.stream:
            raise invalid("stream", "`stream` must be false in a batch file")
        rid = f"{'chatcmpl' if param == 'messages' else 'cmpl'}-{uuid.uuid4().hex}"
        ctx = shapers.ResponseContext(rid, int(time.time()), self.info.name, lambda t: self.llm.tokenizer.decode([t]),
                                      sum(map(len, prompts)), logprobs=req.params.logprobs is not None, n=req.n)
        requests = [EngineRequest(f"{rid}-{p * req.n + i}", list(ids),
                                  P.finalize_params(req, i, len(ids), self.info, param))
                    for p, ids in enumerate(prompts) for i in range(req.n)]
        self._add(Pending(custom_id, url, ctx, [], 0), requests, param)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.llm.tokenizer
        try:
            text = tok.apply_chat_template(messages, chat_template=self.template or None, tokenize=False,
                                           add_generation_prompt=True)
        except Exception as exc:
            raise invalid("messages", f"cannot apply the chat template: {exc}") from None
        return tok.encode(text, add_special_tokens=False)

    def _submit_embeddings(self, custom_id: str, body: dict) -> None:
        inputs, encoding, dimensions = parse_embeddings(body, self.info, self.llm.core.runner.arch.hidden_size, 2048)
        prompts = [self.llm.tokenizer.encode(x) if isinstance(x, str) else x for x in inputs]
        rid = f"embd-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0)
        requests = [EngineRequest(f"{rid}-{i}", list(ids), params, pooling=self.llm.config.embedding_pooling)
                    for i, ids in enumerate(prompts)]
        ctx = shapers.ResponseContext(rid, 0, self.info.name, str, sum(map(len, prompts)))
        self._add(Pending(custom_id, "/v1/embeddings", ctx, [], 0, (encoding, dimensions)), requests, "input")

    def _add(self, item: Pending, requests: list[EngineRequest], param: str) -> None:
        core = self.llm.core
        for r in requests:   # all choices or none, as the server admits them
            try:
                core.check_request(r)
            except RequestRejectedError as exc:
                raise invalid(param if exc.param in ("prompt", "max_tokens") else exc.param, str(exc),
                              code=exc.code) from None
        for i, r in enumerate(requests):
            core.admit(r)
            item.states.append(ChoiceState(i, r))
            self.pending[r.request_id] = item
        item.open = len(requests)

    # ---- the engine ----------------------------------------------------------------------
    def step(self) -> None:
        outputs, _ = self.llm.core.step()
        now = time.monotonic()
        for out in outputs:
            item = self.pending.pop(out.request_id, None) if out.finished else self.pending.get(out.request_id)
            if item is None:
                continue
            state = next(s for s in item.states if s.request.request_id == out.request_id)
            try:
                state.update(out, now)
            except APIError as exc:
                state.finish_reason = "error"
                self._fail(item, exc)
                continue
            if out.finished:
                item.open -= 1
                if item.open == 0:
                    self._finish(item)

    def _fail(self, item: Pending, error: APIError) -> None:
        for s in item.states:   # the other choices of a failed request are dropped
            if self.pending.pop(s.request.request_id, None) is not None:
                self.llm.core.abort(s.request.request_id)
        item.open = -1
        self.write_error(item.custom_id, error, 0)

    def _finish(self, item: Pending) -> None:
        if item.embed is not None:
            encoding, dimensions = item.embed
            data = [{"object": "embedding", "index": s.index,
                     "embedding": shape_vector(s.embedding, dimensions, encoding)} for s in item.states]
            total = item.ctx.prompt_tokens
            body = {"object": "list", "data": data, "model": self.info.name,
                    "usage": {"prompt_tokens": total, "total_tokens": total}}
        elif item.url == "/v1/chat/completions":
            body = shapers.chat_result(item.states, item.ctx)
        else:
            body = shapers.completion_result(item.states, item.ctx)
        self.write_ok(item.custom_id, body)

    @property
    def in_flight(self) -> int:
        return len(self.pending)


def _read_line(raw: bytes, seen: set) -> tuple[str, str, dict]:
    """(custom_id, url, body) of one input line; APIError (param None) when malformed."""
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(None, f"the line is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str) or not row["custom_id"]:
        raise invalid("custom_id", "each line needs a non-empty string `custom_id`")
    custom_id = row["custom_id"]
    if custom_id in seen:
        raise invalid("custom_id", f"duplicate custom_id {custom_id!r}", code="duplicate_custom_id")
    seen.add(custom_id)
    if row.get("method", "POST") != "POST":
        raise invalid("method", "`method` must be POST")
    if row.get("url") not in URLS:
        raise APIError(404, f"`url` must be one of {', '.join(URLS)}", param="url", code="not_found")
    if not isinstance(row.get("body"), dict):
        raise invalid("body", "`body` must be a JSON object")
    return custom_id, row["url"], row["body"]


def run_batch(llm: LLM, input_path: Path, output_path: Path, progress: bool = True) -> dict:
    """Run every request of input_path not yet answered in output_path; returns the counts."""
    from tqdm import tqdm
    done = done_keys(output_path)
    lines = [raw for raw in input_path.read_bytes().splitlines() if raw.strip()]
    window = WINDOW_PER_SEQ * llm.config.max_num_seqs
    seen: set = set()
    with open(output_path, "ab") as out, tqdm(total=len(lines), unit="req", disable=not progress) as bar:
        runner = BatchRunner(llm, out, bar)
        for number, raw in enumerate(lines, start=1):
            custom_id = None
            try:
                custom_id, url, body = _read_line(raw, seen)
                if custom_id in done:
                    runner.counts["skipped"] += 1
                    bar.update(1)
                    continue
                runner.submit(custom_id, url, body)
            except Exception as exc:   # APIError, or a bug's 500: the line fails, the file goes on
                if custom_id is None and ("line", number) in done:
                    runner.counts["skipped"] += 1
                    bar.update(1)
                    continue
                runner.write_error(custom_id, from_exception(exc), number)
            while runner.in_flight >= window:
                runner.step()
        while runner.in_flight:
            runner.step()
    return runner.counts


def batch_command(config: Config, input_path: str, output_path: str) -> int:
    with LLM(**vars(config)) as llm:
        counts = run_batch(llm, Path(input_path), Path(output_path))
    print(f"{counts['ok']} ok, {counts['error']} errors, {counts['skipped']} already in {output_path}")
    return 0
