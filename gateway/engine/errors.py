"""Errors the engine raises toward the API layer; each maps to one HTTP status there."""


class EngineDeadError(RuntimeError):
    """The engine loop (or a worker) died: in-flight and new requests fail with 503."""


class QueueFullError(RuntimeError):
    """Too many waiting requests: 429 with Retry-After."""


class RequestRejectedError(ValueError):
    """The request cannot be served as asked (e.g. prompt + max_tokens beyond the context): 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
