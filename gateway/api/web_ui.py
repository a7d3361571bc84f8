"""The built-in web chat page: `web_ui_routes(config) -> list[BaseRoute]` (empty when
config.web_ui is False, i.e. `--no-web-ui`).

GET / answers the page (gateway/api/web/index.html); GET /ui/{name} its script, style sheet
and icon. They are package data, read once when the routes are built; nothing is fetched from
anywhere else (no CDN), and there is no build step. The page talks only to this server's API
(/v1/models, /v1/chat/completions, /v1/sessions/...), with the user's API key as a bearer
token when the server wants one: the page and its assets carry no data, so they are served
without a key (middleware.OPEN_PATHS includes PUBLIC_PATHS) and a 401 from the API tells the
page to ask for the key.

Headers: a strict Content-Security-Policy (only this origin's script, style, images and
fetches; no inline code, no eval, no frames, Trusted Types required so no string can ever be
assigned as HTML); nosniff; no referrer. Caching: the page is `no-cache` with an ETag (every
load revalidates, so an upgrade shows at once); it names its assets with `?v=<digest>`, and an
asset asked for with the current digest is immutable for a year (other versions: no-cache)."""

from __future__ import annotations

import hashlib
from importlib import resources

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.config import Config

ASSETS = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
PUBLIC_PATHS = frozenset({"/"} | {f"/ui/{name}" for name in ASSETS})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "require-trusted-types-for 'script'; trusted-types 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
IMMUTABLE = "public, max-age=31536000, immutable"


def _read(name: str) -> bytes:
    return resources.files("gateway.api").joinpath("web", name).read_bytes()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class _Static:
    """One file's bytes and ETag; answers 304 when the browser already holds this version."""

    def __init__(self, data: bytes, content_type: str, versioned: bool):
        self.data, self.content_type, self.versioned = data, content_type, versioned
        self.version = _digest(data)
        self.etag = f'"{self.version}"'

    async def respond(self, request) -> Response:
        fresh = self.versioned and request.query_params.get("v") == self.version
        headers = {**SECURITY_HEADERS, "ETag": self.etag,
                   "Cache-Control": IMMUTABLE if fresh else "no-cache"}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.data, headers=headers, media_type=self.content_type)


def _page(assets: dict[str, _Static]) -> _Static:
    html = _read("index.html").decode("utf-8")
    for name, asset in assets.items():   # e.g. /ui/chat.js → /ui/chat.js?v=<digest>
        html = html.replace(f"/ui/{name}\"", f"/ui/{name}?v={asset.version}\"")
    return _Static(html.encode("utf-8"), "text/html; charset=utf-8", versioned=False)


def web_ui_routes(config: Config) -> list[BaseRoute]:
    if not config.web_ui:
        return []
    assets = {name: _Static(_read(name), kind, versioned=True) for name, kind in ASSETS.items()}
    routes: list[BaseRoute] = [Route("/", _page(assets).respond, methods=["GET", "HEAD"])]
    routes += [Route(f"/ui/{name}", asset.respond, methods=["GET", "HEAD"]) for name, asset in assets.items()]
    return routes
