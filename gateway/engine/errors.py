"""Errors the engine raises toward the API layer; each maps to one HTTP status there."""


class EngineDeadError(RuntimeError):
    """The engine loop (or a worker) died: in-flight and new requests fail with 503."""


class QueueFullError(RuntimeError):
    """Too many waiting requests: 429 with Retry-After."""


class RequestRejectedError(ValueError):
    """The request cannot be served as asked (e.g. prompt + max_tokens beyond the context): 400."""

    def __init__(self, message: str, param: str | None = None, code: str = "request_rejected"):
        super().__init__(message)
        self.param, self.code = param, code


def context_length_message(max_model_len: int, prompt_len: int, max_tokens: int) -> str:
    """The one wording of 'prompt + max_tokens does not fit', naming both numbers (OpenAI's phrasing)."""
    return (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            f"Reduce the prompt or max_tokens.")


def check_context_length(max_model_len: int, prompt_len: int, max_tokens: int) -> None:
    if prompt_len + max_tokens > max_model_len:
        raise RequestRejectedError(context_length_message(max_model_len, prompt_len, max_tokens), "max_tokens",
                                   code="context_length_exceeded")
