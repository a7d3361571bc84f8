"""OpenAI error objects and the one mapping from exceptions to HTTP statuses.

Owns: `APIError` (raised anywhere in the API layer with status, type, param and code),
the wire body {"error": {"message", "type", "param", "code"}}, `json_response` (orjson), and
`from_exception`, the single place that decides which exception becomes which status.
Side effects: none, except that `from_exception` logs the traceback of genuine internal
errors (the only exceptions that become a 500)."""

from __future__ import annotations

import logging

import orjson
from starlette.responses import Response

from gateway.engine.errors import EngineDeadError, QueueFullError, RequestRejectedError
from gateway.sampling.params import SamplingParamsError

log = logging.getLogger("gateway.api")

# Type names follow vLLM's server (and the openai client's exception class names).
ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
    404: "NotFoundError", 405: "MethodNotAllowedError", 408: "RequestTimeoutError",
    413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError", 422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
RETRY_AFTER_SECONDS = "1"   # queue-full is transient: the queue drains at decode speed


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, headers=headers, media_type="application/json")


class APIError(Exception):
    """An error that is meant for the client: status, OpenAI type, offending param, code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "APIError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming the offending parameter."""
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def from_exception(exc: BaseException) -> APIError:
    """Map any exception raised while serving one request to the error the client sees.

    Input problems are 400s; only exceptions we cannot attribute to the request are 500s,
    and those (and only those) are logged with their traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return invalid(exc.param, str(exc))
    if isinstance(exc, RequestRejectedError):
        return invalid(exc.param, str(exc), code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "Too many requests are waiting; retry later.",
                        code="queue_full", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(exc, EngineDeadError):   # why it died (a worker's pid, a traceback) is for the log
        return APIError(503, "The engine is not running.", code="engine_dead")
    log.error("internal error while serving a request", exc_info=exc)
    return APIError(500, "Internal server error; see the server log.", code="internal_error")
