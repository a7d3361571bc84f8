"""The one configuration object. Built once (by the CLI or the Python API), validated
in __post_init__, then passed down; no other module reads the CLI or the environment."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str | int) -> int:
    """'4GiB' / '512MB' / '1e9'-free integers → bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"cannot parse a memory size from {text!r} (examples: 2GiB, 512MB, 1000000)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class Config:
    # model
    model: str | None = None              # HF directory or .gguf file; None → default model
    model_module: str | None = None       # user Python file registering model classes
    served_model_name: str | None = None
    dtype: str = "auto"                   # auto|bfloat16|float16|float32
    quantization: str = "auto"            # auto|none|int8|int4: auto keeps a GGUF's packed types
    device: str = "cpu"                   # cpu|cuda|auto (checked here; resolved by executor/placement.py)
    max_model_len: int | None = None      # None → the model's own context length
    chat_template: str | None = None      # path to a Jinja template overriding the tokenizer's
    cache_dir: str = "~/.cache/gateway"   # converted GGUF models live here
    # scheduling / KV cache
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_prefill_tokens_with_decodes: int = 512   # prefill share of a step that also decodes (ITL)
    block_size: int = 16
    kv_cache_memory: str | None = None    # bytes ("2GiB") for the KV pool
    num_kv_blocks: int | None = None      # or an exact block count (wins over kv_cache_memory)
    enable_prefix_caching: bool = True
    max_waiting_requests: int = 1024      # accepted but not yet scheduled; one more → 429
    # execution
    tensor_parallel_size: int = 1
    num_threads: int | None = None        # compute threads per rank; None → cores // tp
    tp_comm: str = "auto"                 # tensor-parallel collectives: auto|shm|gloo|nccl
    kernel_backend: str = "auto"          # auto|torch|triton
    enforce_eager: bool = False
    seed: int = 0
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    guard_metrics: bool = False
    metrics_compat: str | None = None     # "vllm" also exposes vllm:* families
    max_request_bytes: int = 4 * 2**20
    cors_origins: list[str] = field(default_factory=list)
    cors_allow_methods: list[str] = field(default_factory=lambda: ["*"])
    cors_allow_headers: list[str] = field(default_factory=lambda: ["*"])
    cors_allow_credentials: bool = False
    request_timeout: float | None = None  # seconds from arrival; expiry aborts the request (408)
    log_level: str = "info"
    # shutdown and connection hygiene (gateway/api/server.py, gateway/api/connections.py)
    shutdown_grace_s: float = 25.0        # SIGTERM: in-flight requests get this long, then an error
    max_connections: int = 4096           # open client connections; at the cap the longest idle goes
    header_timeout_s: float = 10.0        # a request head must arrive within this (idle/slowloris)
    keep_alive_timeout_s: float = 65.0    # idle keep-alive; above the usual 60 s of proxies and LBs
    max_header_bytes: int = 16384         # a larger request head is refused
    # server-side chat sessions (gateway/api/sessions.py)
    max_sessions: int = 64                # live sessions; one more → 429
    session_ttl_s: float = 1800.0         # idle sessions are unpinned and dropped after this
    session_kv_budget_blocks: int | None = None   # KV blocks sessions may pin; None → half the pool

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")
        if self.quantization not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"--quantization must be auto, none, int8 or int4, not {self.quantization!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"--device must be cpu, cuda or auto, not {self.device!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel backend must be auto, torch or triton, not {self.kernel_backend!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_with_decodes",
                     "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)  # fail early on a malformed size
        if self.max_sessions < 0 or self.session_ttl_s <= 0:
            raise ValueError("max_sessions must be >= 0 and session_ttl_s > 0")
        if self.session_kv_budget_blocks is not None and self.session_kv_budget_blocks < 0:
            raise ValueError("session_kv_budget_blocks must be >= 0")
        if self.max_waiting_requests < 1:   # every request waits until the next step: 0 would refuse all
            raise ValueError("max_waiting_requests must be >= 1")
        if self.request_timeout is not None and not 0 < self.request_timeout < float("inf"):
            raise ValueError(f"--request-timeout must be a positive number of seconds, not {self.request_timeout!r}")
        if self.tp_comm not in ("auto", "shm", "gloo", "nccl"):
            raise ValueError(f"--tp-comm must be auto, shm, gloo or nccl, not {self.tp_comm!r}")
        self._check_server_limits()
        if self.metrics_compat not in (None, "vllm"):
            raise ValueError(f"--metrics-compat must be 'vllm', not {self.metrics_compat!r}")

    def _check_server_limits(self) -> None:
        # An empty key would let `Authorization: Bearer ` (no token) in.
        if any(not isinstance(k, str) or not k.strip() for k in self.api_keys):
            raise ValueError("--api-key must not be empty or whitespace-only")
        if not 0 <= self.shutdown_grace_s < float("inf"):
            raise ValueError(f"--shutdown-grace must be >= 0 seconds, not {self.shutdown_grace_s!r}")
        for flag, value in (("--header-timeout", self.header_timeout_s),
                            ("--keep-alive-timeout", self.keep_alive_timeout_s)):
            if not 0 < value < float("inf"):
                raise ValueError(f"{flag} must be a positive number of seconds, not {value!r}")
        if self.max_connections < 1:
            raise ValueError("--max-connections must be >= 1")
        if self.max_header_bytes < 1024:
            raise ValueError("--max-header-bytes must be >= 1024")

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
