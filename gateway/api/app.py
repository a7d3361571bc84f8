"""Routes: `build_app(engine, config, metrics=None) -> Starlette`.

Per generation request, in order: a JSON content type (415 otherwise: a form or text/plain post,
which any web page may send without a CORS preflight, must not start generation) → read the
body (the body limit applies) → parse and validate (protocol.py; every list bounded; 400/404
before any tokenization) → check the engine is alive (503) → tokenize (tokenizing.py: inline
when small, else on its one thread, so the event loop only moves bytes; failures are 400s) →
fit max_tokens to the context (400) →
the deadline (--request-timeout, shortened by an `X-Request-Timeout: <seconds>` header; a bad
header is a 400) → Job.start() submits the n choices → stream frames (SSEResponse) or collect
them while watching for a client disconnect → Job.close() aborts what is unfinished and records metrics.

The app's lifespan starts the engine loop (inside uvicorn's event loop, which the engine
delivers its outputs to) and shuts it down on exit. build_app creates nothing else: the
engine and the metrics come from server.py (or from a test)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from functools import wraps

import orjson
from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route

import gateway
from gateway.api import protocol as P
from gateway.api.errors import (RETRY_AFTER_SECONDS, APIError, from_exception, invalid, json_response,
                                model_not_found)
from gateway.api.middleware import build_middleware
from gateway.api.openapi import build_openapi
from gateway.api.streaming import (Job, ResponseContext, SSEResponse, chat_events, chat_result,
                                   completion_events, completion_result)
from gateway.api.tokenizing import Tokenizing
from gateway.config import Config
from gateway.engine.messages import EngineRequest

log = logging.getLogger("gateway.api")


def _guarded(handler):
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


async def _read_json(request) -> dict:
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


def _timeout(request, config: Config) -> float | None:
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


async def _until_disconnect(request, work):
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


class _API:
    def __init__(self, engine, config: Config, metrics=None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.info = P.ModelInfo(engine.model_name, len(engine.tokenizer), engine.max_model_len)
        self.created = int(time.time())
        self.tokenizing = Tokenizing(engine)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat prompt's token ids; a template failure is the client's input: 400."""
        try:
            return await self.tokenizing.chat(messages)
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

    def _check_alive(self) -> None:
        if not self.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")
        if getattr(self.engine, "draining", False):   # SIGTERM: in-flight work finishes, no new work
            raise APIError(503, "The server is shutting down; retry the request.", code="server_shutting_down",
                           headers={"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"})

    def _check_model(self, body: dict) -> None:
        model = P.get(body, "model", "string")
        if model is not None and model != self.info.name:
            raise model_not_found(model)

    def _context(self, prefix: str, req: P.GenerationRequest, prompt_tokens: int, echo=None) -> ResponseContext:
        return ResponseContext(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.info.name,
                               self.engine.token_str, prompt_tokens, req.include_usage, echo)

    def _requests(self, ctx: ResponseContext, req: P.GenerationRequest, prompts: list[list[int]],
                  param: str, arrival: float) -> list[EngineRequest]:
        return [EngineRequest(f"{ctx.rid}-{p * req.n + i}", list(ids),
                              P.finalize_params(req, i, len(ids), self.info, param), arrival)
                for p, ids in enumerate(prompts) for i in range(req.n)]

    async def _run(self, request, req: P.GenerationRequest, requests, ctx, events, result, arrival):
        job = Job(self.engine, requests, self.metrics, arrival, req.n, req.max_tokens,
                  _timeout(request, self.config))
        job.start()
        if req.stream:
            refused = await job.refused()
            if refused is None:
                return SSEResponse(events(job, ctx))   # the frame generator closes the job
            await job.close()
            raise refused
        try:
            states = await _until_disconnect(request, job.collect())
        finally:
            await job.close()
        if states is None:   # nobody is listening; 499 is what proxies log for this
            return Response(status_code=499)
        return json_response(result(states, ctx, req.params.logprobs is not None))

    @_guarded
    async def chat(self, request):
        arrival = time.monotonic()
        req = P.parse_chat(await _read_json(request), self.info)
        self._check_alive()
        prompt = await self.encode_chat(req.messages)
        ctx = self._context("chatcmpl", req, len(prompt))
        requests = self._requests(ctx, req, [prompt], "messages", arrival)
        return await self._run(request, req, requests, ctx, chat_events, chat_result, arrival)

    @_guarded
    async def completions(self, request):
        arrival = time.monotonic()
        req = P.parse_completion(await _read_json(request), self.info)
        self._check_alive()
        prompts = [await self.encode(p, "prompt") if isinstance(p, str) else p for p in req.prompts]
        echo = None
        if req.echo:
            texts = [p if isinstance(p, str) else await self.tokenizing.decode(p) for p in req.prompts]
            echo = [t for t in texts for _ in range(req.n)]
        ctx = self._context("cmpl", req, sum(map(len, prompts)), echo)
        requests = self._requests(ctx, req, prompts, "prompt", arrival)
        return await self._run(request, req, requests, ctx, completion_events, completion_result, arrival)

    def _model_card(self) -> dict:
        return {"id": self.info.name, "object": "model", "created": self.created, "owned_by": "gateway",
                "root": self.config.model, "max_model_len": self.info.max_model_len}

    @_guarded
    async def models(self, request):
        return json_response({"object": "list", "data": [self._model_card()]})

    @_guarded
    async def model(self, request):
        if request.path_params["model"] != self.info.name:
            raise model_not_found(request.path_params["model"])
        return json_response(self._model_card())

    @_guarded
    async def tokenize(self, request):
        body = await _read_json(request)
        unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens"}
        if unknown:
            raise invalid(sorted(unknown)[0], f"Unrecognized request argument supplied: {sorted(unknown)[0]}")
        self._check_model(body)
        if ("prompt" in body) == ("messages" in body):
            raise invalid("prompt", "send exactly one of `prompt` or `messages`")
        special = P.get(body, "add_special_tokens", "boolean", True)
        if "messages" in body:
            tokens = await self.encode_chat(P.parse_messages(body))
        else:
            tokens = await self.encode(P.get(body, "prompt", "string", ""), "prompt", special)
        return json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_model_len})

    @_guarded
    async def detokenize(self, request):
        body = await _read_json(request)
        unknown = set(body) - {"model", "tokens"}
        if unknown:
            raise invalid(sorted(unknown)[0], f"Unrecognized request argument supplied: {sorted(unknown)[0]}")
        self._check_model(body)
        tokens = P.check_ids(P.get(body, "tokens", "array", []), "tokens", self.info.vocab_size)
        return json_response({"prompt": await self.tokenizing.decode(tokens)})

    async def health(self, request):
        # Liveness: a dead engine loop never recovers, so let the orchestrator restart us.
        if self.engine.is_alive:
            return json_response({"status": "ok"})
        return json_response({"status": "engine dead"}, 503)

    async def ready(self, request):
        draining = getattr(self.engine, "draining", False)   # the load balancer must stop routing now
        ready = self.engine.is_alive and self.engine.is_ready() and not draining
        try:
            in_use = self.engine.num_kv_blocks_in_use()
        except Exception:   # a dead engine cannot answer; readiness already says so
            in_use = None
        status = "ready" if ready else "draining" if draining else "not ready"
        body = {"status": status, "model": self.info.name, "kv_blocks_in_use": in_use}
        worker_pids = getattr(self.engine, "worker_pids", None)
        if worker_pids is not None:   # tensor-parallel worker processes (empty at --tp 1)
            body["worker_pids"] = worker_pids()
        return json_response(body, 200 if ready else 503)

    async def version(self, request):
        return json_response({"version": gateway.__version__})

    async def metrics_route(self, request):
        if self.metrics is None:
            return APIError(404, "metrics are not enabled", code="not_found").response()
        payload, content_type = self.metrics.render()
        return Response(payload, headers={"content-type": content_type})

    async def openapi(self, request):
        return json_response(build_openapi(self.info.name, gateway.__version__))


async def _http_error(request, exc: HTTPException) -> Response:
    error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                     headers=dict(exc.headers or {}))
    return error.response()


async def _internal_error(request, exc: Exception) -> Response:
    return from_exception(exc).response()   # logs the traceback


def build_app(engine, config: Config, metrics=None) -> Starlette:
    api = _API(engine, config, metrics)
    from gateway.api.sessions import SessionRoutes   # here: sessions.py imports this module
    sessions = SessionRoutes(api, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await sessions.store.close()   # unpins every session's KV blocks
            api.tokenizing.close()
            await engine.shutdown()

    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/metrics", api.metrics_route, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        *sessions.routes(),
    ]
    return Starlette(routes=routes, middleware=build_middleware(config), lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _internal_error})
