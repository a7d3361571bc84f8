"""POST /v1/embeddings: parse → tokenize → one engine submit of prefill-only sequences (one per
input, pooled by the engine with Config.embedding_pooling and L2-normalized) → the OpenAI list.

Order per request: JSON body → fields checked (unknown ones 400; `input` a string, strings,
token ids or lists of ids, at most MAX_INPUTS items, none empty; `encoding_format` float or
base64; `dimensions` 1..the model's hidden size) → tokenize (each input at most the context:
400; all of them together at most MAX_TOTAL_TOKENS: 413) → admit all inputs in one Job (the
scheduler batches them with whatever else runs; each frees its blocks in the step that
finishes its prompt) → collect, watching for a disconnect → truncate to `dimensions` and
renormalize → float lists or base64 of little-endian float32 (what the openai SDK decodes)."""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np
from starlette.responses import Response

from gateway.api import protocol as P
from gateway.api.errors import APIError, invalid, json_response
from gateway.api.pipeline import Pipeline, request_timeout, until_disconnect
from gateway.api.streaming import Job
from gateway.engine.errors import RequestRejectedError
from gateway.engine.messages import EngineRequest
from gateway.sampling.params import SamplingParams

MAX_INPUTS = 2048              # OpenAI's limit; also at most --max-waiting-requests
MAX_TOTAL_TOKENS = 300_000     # OpenAI's per-request limit
FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def parse_inputs(value, vocab_size: int, limit: int) -> list[str | list[int]]:
    """`input` as a list of strings / token-id lists (a lone string or id list is one input)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid("input", "`input` must be a non-empty string, array of strings, array of token ids "
                               "or array of token-id arrays")
    if len(value) > limit:
        raise invalid("input", f"`input` holds {len(value)} items; at most {limit} per request",
                      code="too_many_inputs")
    out = []
    for item in value:
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, list) and item and not isinstance(item[0], bool):
            out.append(P.check_ids(item, "input", vocab_size))
        else:
            raise invalid("input", "each `input` item must be a non-empty string or a non-empty array of token ids")
    return out


def parse_body(body: dict, info: P.ModelInfo, hidden_size: int, limit: int) -> tuple[list, str, int | None]:
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise invalid(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", code="unknown_parameter")
    model = P.get(body, "model", "string")
    if model is not None and model != info.name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    P.get(body, "user", "string")
    if "input" not in body:
        raise invalid("input", "`input` is required", code="missing_required_parameter")
    inputs = parse_inputs(body["input"], info.vocab_size, limit)
    encoding = P.get(body, "encoding_format", "string", "float")
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", "`encoding_format` must be float or base64")
    dimensions = P.get(body, "dimensions", "integer")
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        raise invalid("dimensions", f"`dimensions` must be in [1, {hidden_size}] for this model (its hidden "
                                    f"size), got {dimensions}")
    return inputs, encoding, dimensions


def shape_vector(vector: list[float], dimensions: int | None, encoding: str) -> list[float] | str:
    v = np.asarray(vector, dtype=np.float32)
    if dimensions is not None and dimensions < len(v):
        v = v[:dimensions]
        norm = float(np.linalg.norm(v))
        v = v / norm if norm > 0 else v
    if encoding == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


async def embeddings_route(pipe: Pipeline, request, body: dict):
    arrival = time.monotonic()
    limit = min(MAX_INPUTS, pipe.config.max_waiting_requests)
    inputs, encoding, dimensions = parse_body(body, pipe.info, pipe.engine.embedding_size, limit)
    pipe.check_alive()
    prompts = [await pipe.encode(x, "input") if isinstance(x, str) else x for x in inputs]
    total = sum(map(len, prompts))
    if total > MAX_TOTAL_TOKENS:
        raise APIError(413, f"`input` holds {total} tokens; at most {MAX_TOTAL_TOKENS} per request",
                       param="input", code="input_too_large")
    rid = f"embd-{uuid.uuid4().hex}"
    params = SamplingParams(max_tokens=1, temperature=0)
    requests = [EngineRequest(f"{rid}-{i}", list(ids), params, arrival, pooling=pipe.config.embedding_pooling)
                for i, ids in enumerate(prompts)]
    job = Job(pipe.engine, requests, pipe.metrics, arrival, 1, 1, request_timeout(request, pipe.config))
    try:
        try:
            job.start()
        except RequestRejectedError as exc:
            raise invalid("input", str(exc), code=exc.code) from None
        states = await until_disconnect(request, job.collect())
    finally:
        job.close()
    if states is None:   # nobody is listening
        return Response(status_code=499)
    data = [{"object": "embedding", "index": s.index, "embedding": shape_vector(s.embedding, dimensions, encoding)}
            for s in states]
    return json_response({"object": "list", "data": data, "model": pipe.info.name,
                          "usage": {"prompt_tokens": total, "total_tokens": total}})
