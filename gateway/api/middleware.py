"""HTTP middleware, pure ASGI (no Request object built per request): CORS, API keys, body limit.

`build_middleware(config)` returns them outermost first:
1. CORS (Starlette's CORSMiddleware, only when config.cors_origins is set; methods, headers
   and credentials from config.cors_allow_*): outermost, so preflights never need a key and
   401/413 answers still carry the CORS headers;
2. APIKeyMiddleware (only when config.api_keys is non-empty): every path except /health,
   /ready, the web chat page and its assets (web_ui.PUBLIC_PATHS: static files, no data; the
   page sends the key on its API calls) — and /metrics unless config.guard_metrics — needs `Authorization: Bearer <key>`
   (constant-time over every key; an empty key is refused at construction, an empty token always);
3. BodyLimitMiddleware: 413 past config.max_request_bytes, decided from Content-Length before
   the app runs, or by counting the chunks as the app reads them (chunked uploads have none).
Side effects: none but the responses they send instead of the app's."""

from __future__ import annotations

import hashlib
import hmac

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from gateway.api.errors import APIError
from gateway.api.web_ui import PUBLIC_PATHS
from gateway.config import Config

OPEN_PATHS = frozenset({"/health", "/ready"}) | PUBLIC_PATHS


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class APIKeyMiddleware:
    def __init__(self, app, api_keys: list[str], guard_metrics: bool = False):
        self.app = app
        if not api_keys or any(not k.strip() for k in api_keys):   # Config refuses these already
            raise ValueError("API keys must be non-empty")
        # Comparing fixed-size digests keeps compare_digest's timing independent of key lengths.
        self.digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.open_paths = OPEN_PATHS if guard_metrics else OPEN_PATHS | {"/metrics"}

    def authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        digest = hashlib.sha256(token).digest()
        ok = False
        for expected in self.digests:   # no early exit: every key is compared on every request
            ok |= hmac.compare_digest(digest, expected)
        # An empty token never passes, whatever the keys (`Bearer ` alone is no credential).
        return ok and bool(token) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)   # routes turn an APIError into its response
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except APIError as exc:   # only when the app let it escape (e.g. a route not catching it)
            if exc.status != 413 or started:
                raise
            await exc.response()(scope, receive, send)


def build_middleware(config: Config) -> list[Middleware]:
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=list(config.cors_allow_methods),
                                     allow_headers=list(config.cors_allow_headers),
                                     allow_credentials=config.cors_allow_credentials))
    if config.api_keys:
        middleware.append(Middleware(APIKeyMiddleware, api_keys=list(config.api_keys),
                                     guard_metrics=config.guard_metrics))
    middleware.append(Middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes))
    return middleware
