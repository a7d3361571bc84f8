"""The one request pipeline every generation route runs (chat completions, completions,
session turns): parse → tokenize/render → admit → run → shape, plus the pieces all routes
share (error guard, JSON body, deadline header, disconnect watch). app.py and sessions.py
both build on this module and not on each other.

Per generation request, in order: a JSON content type (415 otherwise: a form or text/plain
post, which any web page may send without a CORS preflight, must not start generation) → read
the body (the body limit applies) → parse and validate (protocol.py; every list bounded;
400/404 before any tokenization) → check the engine is alive and not draining (503) →
tokenize (tokenizing.py: inline when small, else on its one thread, so the event loop only
moves bytes; failures are 400s) → admit: the deadline header (400 if malformed), one
SamplingParams per choice (max_tokens left unset is the rest of the context), then one
engine.submit for all choices, whose refusals come back synchronously (the engine's check of
prompt + max_tokens against the context is the only one: 400; queue full: 429; dead: 503) →
run: stream frames (SSEResponse) or collect them while watching for a client disconnect →
shape (shapers.py) → Job.close() aborts what is unfinished and records metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from functools import wraps

import orjson
from jinja2 import TemplateError
from starlette.responses import Response

from gateway.api import protocol as P
from gateway.api import tool_formats
from gateway.api import tools as T
from gateway.api.errors import RETRY_AFTER_SECONDS, APIError, from_exception, invalid, json_response, model_not_found
from gateway.api.shapers import OnComplete, ResponseContext, Shape
from gateway.api.streaming import Job, SSEResponse
from gateway.api.tokenizing import Tokenizing
from gateway.config import Config
from gateway.engine.client import EngineClient
from gateway.engine.errors import RequestRejectedError
from gateway.engine.messages import EngineRequest

log = logging.getLogger("gateway.api")


def guarded(handler):
    """Every failure becomes an OpenAI error object; only genuine bugs are 500s (logged)."""
    @wraps(handler)
    async def wrapped(self, request):
        try:
            return await handler(self, request)
        except Exception as exc:
            return from_exception(exc).response()
    return wrapped


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json, parameters (charset) ignored."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request) -> dict:
    if not _is_json(request.headers.get("content-type", "")):
        raise APIError(415, "The request body must be JSON, sent with `Content-Type: application/json`.",
                       code="unsupported_media_type")
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(None, f"Malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object", code="invalid_json")
    return body


def request_timeout(request, config: Config) -> float | None:
    """Seconds this request may take from arrival: the server's limit, or less if the client asks.
    On expiry the request is aborted and answered 408 (an error frame once streaming): the
    deadline is a limit, not a server fault, so it stays out of the 5xx that alerting counts."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return config.request_timeout
    try:
        asked = float(raw)
    except ValueError:
        asked = float("nan")
    if not 0 < asked < float("inf"):
        raise invalid(None, f"X-Request-Timeout must be a positive number of seconds, got {raw!r}",
                      code="invalid_header")
    return asked if config.request_timeout is None else min(asked, config.request_timeout)


async def until_disconnect(request, work):
    """Result of `work`, or None if the client disconnects first (work is then cancelled)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return tasks[0].result() if tasks[0].done() else None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Pipeline:
    """The engine, config and tokenizer work one generation request needs, in pipeline order."""

    def __init__(self, engine: EngineClient, config: Config, metrics=None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.tokenizing = Tokenizing(engine)
        template = getattr(engine, "chat_template", None) or getattr(engine.tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else None
        self.template_uses_tools = T.template_uses_tools(template)
        self.info = P.ModelInfo(engine.model_name, len(engine.tokenizer), engine.max_model_len,
                                tool_formats.detect(template))

    # ---- parse ---------------------------------------------------------------------------
    def check_alive(self) -> None:
        if not self.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")
        if self.engine.draining:   # SIGTERM: in-flight work finishes, no new work
            raise APIError(503, "The server is shutting down; retry the request.", code="server_shutting_down",
                           headers={"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"})

    def check_model(self, body: dict) -> None:
        model = P.get(body, "model", "string")
        if model is not None and model != self.info.name:
            raise model_not_found(model)

    # ---- tokenize / render ---------------------------------------------------------------
    async def encode_chat(self, messages: list[dict], spec: T.ToolSpec | None = None) -> list[int]:
        """The chat prompt's token ids, tools and tool messages rendered for the template
        (tools.py); a template failure is the client's input: 400."""
        rendered, template_tools = T.render(messages, spec, self.template_uses_tools)
        try:
            return await self.tokenizing.chat(rendered, template_tools)
        except (TemplateError, ValueError) as exc:   # raise_exception(...) in the template, roles
            raise invalid("messages", f"cannot apply the chat template: {exc}") from None
        except Exception:   # anything else comes from inside the tokenizer: the log has it
            log.warning("applying the chat template failed", exc_info=True)
            raise invalid("messages", "cannot apply the chat template to these messages") from None

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return await self.tokenizing.encode(text, add_special_tokens)
        except Exception:
            log.warning("tokenizing a prompt failed", exc_info=True)
            raise invalid(param, "cannot tokenize the prompt") from None

    # ---- admit ---------------------------------------------------------------------------
    def admit(self, request, req: P.GenerationRequest, prompts: list[list[int]], param: str, arrival: float,
              prefix: str, echo: list[str] | None = None) -> tuple[Job, ResponseContext]:
        """Submit the n choices of every prompt; a refusal raises here, before any response."""
        timeout = request_timeout(request, self.config)
        ctx = ResponseContext(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.info.name,
                              self.engine.token_str, sum(map(len, prompts)), req.include_usage, echo,
                              req.params.logprobs is not None, n=req.n)
        requests = [EngineRequest(f"{ctx.rid}-{p * req.n + i}", list(ids),
                                  P.finalize_params(req, i, len(ids), self.info, param), arrival)
                    for p, ids in enumerate(prompts) for i in range(req.n)]
        job = Job(self.engine, requests, self.metrics, arrival, req.n, req.max_tokens, timeout)
        try:
            job.start()
        except RequestRejectedError as exc:
            job.close()
            # the engine names its own fields; a prompt, or a max_tokens we derived from it, is `param`
            named = param if exc.param == "prompt" or (exc.param == "max_tokens" and req.max_tokens is None) \
                else exc.param
            raise invalid(named, str(exc), code=exc.code) from None
        except BaseException:
            job.close()
            raise
        return job, ctx

    # ---- run and shape -------------------------------------------------------------------
    async def run(self, request, req: P.GenerationRequest, job: Job, ctx: ResponseContext, shape: Shape,
                  on_complete: OnComplete | None = None, on_exit: Callable[[], None] | None = None) -> Response:
        """The response for an admitted job; on_complete(states) runs once the run ended without
        an error (before [DONE] when streaming), on_exit however the response ends."""
        if req.stream:
            def exit_() -> None:   # also when the frame generator never started (close is idempotent)
                job.close()
                if on_exit is not None:
                    on_exit()
            return SSEResponse(shape.events(job, ctx, on_complete), exit_)
        try:
            try:
                states = await until_disconnect(request, job.collect())
            finally:
                job.close()
            if states is None:   # nobody is listening; 499 is what proxies log for this
                return Response(status_code=499)
            if on_complete is not None:
                await on_complete(states)
            return json_response(shape.result(states, ctx))
        finally:
            if on_exit is not None:
                on_exit()
