"""Routes: `build_app(engine, config, metrics=None) -> Starlette`.

The generation routes (chat completions, completions) are pipeline.py's steps with their own
parse and shape; the session routes (sessions.py) run the same pipeline. The other routes
(models, tokenize, detokenize, health, ready, version, metrics, openapi) answer directly.

The app's lifespan starts the engine loop (inside uvicorn's event loop, which the engine
delivers its outputs to) and shuts it down on exit. build_app creates nothing else: the
engine and the metrics come from server.py (or from a test)."""

from __future__ import annotations

import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route

import gateway
from gateway.api import protocol as P
from gateway.api.embeddings import embeddings_route
from gateway.api.errors import APIError, from_exception, invalid, json_response, model_not_found
from gateway.api.middleware import build_middleware
from gateway.api.openapi import build_openapi
from gateway.api.pipeline import Pipeline, guarded, read_json
from gateway.api.responses_api import responses_route
from gateway.api.sessions import SessionRoutes
from gateway.api.shapers import CHAT, COMPLETION
from gateway.api.tool_shape import TOOL_CHATS
from gateway.api.web_ui import web_ui_routes
from gateway.config import Config
from gateway.engine.client import EngineClient

log = logging.getLogger("gateway.api")


class _API:
    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.engine, self.config = pipeline, pipeline.engine, pipeline.config
        self.metrics, self.info = pipeline.metrics, pipeline.info
        self.created = int(time.time())

    @guarded
    async def chat(self, request):
        arrival, pipe = time.monotonic(), self.pipeline
        req = P.parse_chat(await read_json(request), self.info)
        pipe.check_alive()
        prompt = await pipe.encode_chat(req.messages, req.tools)
        job, ctx = pipe.admit(request, req, [prompt], "messages", arrival, "chatcmpl")
        return await pipe.run(request, req, job, ctx, TOOL_CHATS[req.tools.format] if req.tools and req.tools.active
                              else CHAT)

    @guarded
    async def embeddings(self, request):
        return await embeddings_route(self.pipeline, request, await read_json(request))

    @guarded
    async def responses(self, request):
        return await responses_route(self.pipeline, request, await read_json(request))

    @guarded
    async def completions(self, request):
        arrival, pipe = time.monotonic(), self.pipeline
        req = P.parse_completion(await read_json(request), self.info)
        pipe.check_alive()
        prompts = [await pipe.encode(p, "prompt") if isinstance(p, str) else p for p in req.prompts]
        echo = None
        if req.echo:
            texts = [p if isinstance(p, str) else await pipe.tokenizing.decode(p) for p in req.prompts]
            echo = [t for t in texts for _ in range(req.n)]
        job, ctx = pipe.admit(request, req, prompts, "prompt", arrival, "cmpl", echo)
        return await pipe.run(request, req, job, ctx, COMPLETION)

    def _model_card(self) -> dict:
        return {"id": self.info.name, "object": "model", "created": self.created, "owned_by": "gateway",
                "root": self.config.model, "max_model_len": self.info.max_model_len}

    @guarded
    async def models(self, request):
        return json_response({"object": "list", "data": [self._model_card()]})

    @guarded
    async def model(self, request):
        if request.path_params["model"] != self.info.name:
            raise model_not_found(request.path_params["model"])
        return json_response(self._model_card())

    @guarded
    async def tokenize(self, request):
        body = await read_json(request)
        unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens"}
        if unknown:
            raise invalid(sorted(unknown)[0], f"Unrecognized request argument supplied: {sorted(unknown)[0]}")
        self.pipeline.check_model(body)
        if ("prompt" in body) == ("messages" in body):
            raise invalid("prompt", "send exactly one of `prompt` or `messages`")
        special = P.get(body, "add_special_tokens", "boolean", True)
        if "messages" in body:
            tokens = await self.pipeline.encode_chat(P.parse_messages(body))
        else:
            tokens = await self.pipeline.encode(P.get(body, "prompt", "string", ""), "prompt", special)
        return json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_model_len})

    @guarded
    async def detokenize(self, request):
        body = await read_json(request)
        unknown = set(body) - {"model", "tokens"}
        if unknown:
            raise invalid(sorted(unknown)[0], f"Unrecognized request argument supplied: {sorted(unknown)[0]}")
        self.pipeline.check_model(body)
        tokens = P.check_ids(P.get(body, "tokens", "array", []), "tokens", self.info.vocab_size)
        return json_response({"prompt": await self.pipeline.tokenizing.decode(tokens)})

    async def health(self, request):
        # Liveness: a dead engine loop never recovers, so let the orchestrator restart us.
        if self.engine.is_alive:
            return json_response({"status": "ok"})
        return json_response({"status": "engine dead"}, 503)

    async def ready(self, request):
        draining = self.engine.draining   # the load balancer must stop routing now
        ready = self.engine.is_alive and self.engine.is_ready() and not draining
        try:
            in_use = self.engine.num_kv_blocks_in_use()
        except Exception:   # a dead engine cannot answer; readiness already says so
            in_use = None
        status = "ready" if ready else "draining" if draining else "not ready"
        body = {"status": status, "model": self.info.name, "kv_blocks_in_use": in_use}
        body["worker_pids"] = self.engine.worker_pids()   # tensor-parallel worker processes (empty at --tp 1)
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


def build_app(engine: EngineClient, config: Config, metrics=None) -> Starlette:
    pipeline = Pipeline(engine, config, metrics)
    api, sessions = _API(pipeline), SessionRoutes(pipeline)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        try:
            yield
        finally:
            await sessions.store.close()   # unpins every session's KV blocks
            pipeline.tokenizing.close()
            await engine.shutdown()

    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        Route("/v1/responses", api.responses, methods=["POST"]),
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
        *web_ui_routes(config),
    ]
    return Starlette(routes=routes, middleware=build_middleware(config), lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _internal_error})
