"""Command line: `gateway serve | generate | chat | batch | check-model | worker`.

Parses arguments into one Config and hands it to the command; nothing else reads argv.
The engine and server flags are generated from Config's field metadata (config.Flag), so
their defaults, help and choices live in one place. Heavy imports (torch, transformers)
happen inside the commands, so `--help` is instant."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from gateway.config import Config, flag_of
from gateway.executor.errors import RendezvousError


def _kind(hint) -> type:
    """bool, list, int, float or str: what argparse is asked to build for a field."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def add_config_flags(parser: argparse.ArgumentParser, group: str) -> None:
    """One argparse argument per Config field whose Flag is in `group`, in field order. A flag
    left out is None in the namespace (or its bool default), and config_from_args leaves the
    field to Config's default, so no default is written twice."""
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = flag_of(f)
        if flag is None or flag.group != group:
            continue
        names, kind = flag.option_strings(f.name), _kind(hints[f.name])
        if not names[0].startswith("-"):
            parser.add_argument(f.name, nargs="?", default=None, help=flag.help)
        elif kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_false" if f.default else "store_true",
                                help=flag.help)
        else:
            metavar = None if flag.choices else names[0].lstrip("-").replace("-", "_").upper()
            parser.add_argument(*names, dest=f.name, default=None, metavar=metavar, help=flag.help,
                                action="append" if kind is list else "store", choices=flag.choices,
                                type=kind if kind in (int, float) else None)
        if f.name == "api_keys":   # not a Config field: its keys join api_keys
            parser.add_argument("--api-key-file", default=None, help="file with one API key per line")


def _add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal, in-process or with a server (--url)",
                          allow_abbrev=False)
    chat.add_argument("--url", default=None, help="base URL of an OpenAI-compatible server (e.g. http://host:8000)")
    chat.add_argument("--api-key", default=None, help="for --url (default: $OPENAI_API_KEY)")
    chat.add_argument("--model", dest="model_opt", default=None, help="model path, or the model name with --url")
    add_config_flags(chat, "engine")
    chat.add_argument("--max-history", type=int, default=None, help="keep only the last N turns")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--system", default=None, help="system prompt")


def _chat_options(args: argparse.Namespace, environ):
    """The chat command's own options (the engine's are in the Config)."""
    from gateway.chat import ChatOptions
    return ChatOptions(url=args.url, api_key=args.api_key or environ.get("OPENAI_API_KEY"),
                       model_name=args.model_opt or args.model, max_history=args.max_history,
                       temperature=args.temperature, max_tokens=args.max_tokens, system=args.system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible LLM server", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server", allow_abbrev=False)
    add_config_flags(serve, "engine")
    add_config_flags(serve, "server")
    add_config_flags(serve, "dist")
    worker = sub.add_parser("worker", help="join a multi-host `gateway serve` as node --node-rank (its ranks "
                                           "get their configuration from the leader)", allow_abbrev=False)
    add_config_flags(worker, "dist")
    worker.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    gen = sub.add_parser("generate", help="generate a completion for one prompt, streamed to stdout", allow_abbrev=False)
    gen.add_argument("prompt")
    gen.add_argument("--model", dest="model_opt", default=None)
    add_config_flags(gen, "engine")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    _add_chat_parser(sub)
    batch = sub.add_parser("batch", help="run an OpenAI batch file (JSONL) through the engine, no server; "
                                         "resumable: ids already in OUTPUT are skipped", allow_abbrev=False)
    batch.add_argument("input")
    batch.add_argument("output")
    batch.add_argument("--model", dest="model_opt", default=None)
    add_config_flags(batch, "engine")
    check = sub.add_parser("check-model", help="check a model directory against its registered class")
    check.add_argument("path")
    check.add_argument("--model-module", default=None)
    return parser


def _api_keys(args: argparse.Namespace, environ) -> list[str]:
    """Every key, stripped. An empty one is an error, not a no-op: a blank secret or flag must
    never leave the server open or let `Bearer ` with no token in."""
    flags = args.api_keys or []
    for key in flags:
        if not key.strip():
            raise ValueError("--api-key must not be empty or whitespace-only")
    keys = [k.strip() for k in flags]
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


def _csv(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def config_from_args(args: argparse.Namespace, environ=None) -> Config:
    """The one place where argv and the environment become a Config: a flag given wins, then
    the flag's environment variable, then Config's default."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(Config):
        flag = flag_of(f)
        if flag is None or not hasattr(args, f.name):   # a flag this command does not take
            continue
        value = getattr(args, f.name)
        if value is None and flag.env:
            value = environ.get(flag.env)
        if value is not None and flag.csv:
            value = _csv(value)
        if value is not None:
            values[f.name] = value
    values["model"] = getattr(args, "model_opt", None) or getattr(args, "model", None)
    if hasattr(args, "api_keys"):
        values["api_keys"] = _api_keys(args, environ)
    return Config(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-model":
            from gateway.models.check import check_model_command
            return check_model_command(args.path, args.model_module)
        config = config_from_args(args)
        if args.command == "worker":
            from gateway.executor.node_agent import worker_command
            return worker_command(config, os.environ)
        if args.command == "serve":
            from gateway.api.server import serve
            return serve(config)
        if args.command == "chat":
            from gateway.chat import chat_command
            return chat_command(config, _chat_options(args, environ=os.environ))
        if args.command == "batch":
            from gateway.batch import batch_command
            return batch_command(config, args.input, args.output)
        if args.command == "generate":
            from gateway.engine.llm import generate_command
            return generate_command(config, args.prompt, args.max_tokens, args.temperature, not args.no_chat)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    except RendezvousError as exc:   # a rank missing or failed at start-up: no traceback needed
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
