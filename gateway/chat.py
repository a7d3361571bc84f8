"""`gateway chat`: a terminal chat with history control, in-process or against a server.

Owns ChatSession (the turns, the system prompt and the sampling settings), the command
parser and the read-eval loop. The backends (chat_backends.py) share one interface,
stream(messages, settings) → iterator of text deltas whose close() aborts the request:
InProcessBackend (an LLM in this process), HttpBackend (any OpenAI-compatible server).

The loop, per line: print the prompt marker "> " and flush (stdin may be a pipe) → read a
line (EOF exits cleanly) → a command (exit, clear, config, config set key=value, history,
revert_to N) changes the session and prints a message → anything else is a user turn: the
reply streams to stdout delta by delta, then the turn is appended (the oldest turns are
trimmed past --max-history). Ctrl-C during a reply stops it: the request is aborted, the
partial reply is kept as the turn, and the loop goes on. In-process, SIGINT only sets a flag
checked between engine steps, so an interrupt never lands inside the engine's bookkeeping."""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from dataclasses import asdict, dataclass

from gateway.chat_backends import ChatError, ChatSettings, HttpBackend, InProcessBackend

COMMANDS_HELP = "commands: exit | clear | config | config set key=value | history | revert_to N"


class ChatSession:
    def __init__(self, max_history: int | None = None, **settings):
        if max_history is not None and max_history < 1:
            raise ValueError("--max-history must be at least 1")
        self.max_history = max_history
        self.turns: list[tuple[str, str]] = []          # (user, assistant)
        self.settings = ChatSettings()
        for key, value in settings.items():
            if value is not None:
                self.set(key, str(value))

    def messages(self, user_text: str) -> list[dict]:
        system = self.settings.system
        out = [{"role": "system", "content": system}] if system else []
        for user, reply in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return out + [{"role": "user", "content": user_text}]

    def add_turn(self, user_text: str, reply: str) -> None:
        self.turns.append((user_text, reply))
        if self.max_history is not None:
            del self.turns[:-self.max_history]

    def clear(self) -> None:
        self.turns.clear()

    def revert_to(self, turn: int) -> None:
        """Back to the state before `turn`: turns 0..turn-1 are kept."""
        if not self.turns:
            raise ValueError("revert_to: the history is empty")
        if not 0 <= turn < len(self.turns):
            raise ValueError(f"revert_to: no turn {turn}; the history has turns 0..{len(self.turns) - 1}")
        del self.turns[turn:]

    def set(self, key: str, text: str) -> None:
        """Change one setting; ValueError with a message for unknown keys and bad values."""
        self.settings = self.settings.with_text(key, text)

    def config_lines(self) -> list[str]:
        return [f"{key} = {'(none)' if value is None else value}"
                for key, value in asdict(self.settings).items()]

    def history_lines(self) -> list[str]:
        lines = []
        for index, (user, reply) in enumerate(self.turns):
            lines += [f"[{index}] user: {user}", f"[{index}] assistant: {reply}"]
        return lines or ["(no turns yet)"]


@dataclass
class Command:
    name: str          # exit | clear | config | set | history | revert_to
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """A command, or None when the line is a message for the model."""
    words = line.strip().split(maxsplit=2)
    head = words[0].lstrip("/").lower() if words else ""
    if head in ("exit", "quit", "clear", "history") and len(words) == 1:
        return Command(head if head != "quit" else "exit")
    if head == "config":
        if len(words) == 1:
            return Command("config")
        if words[1].lower() == "set":
            return Command("set", words[2] if len(words) == 3 else "")
    if head == "revert_to" and len(words) <= 2:
        return Command("revert_to", words[1] if len(words) == 2 else "")
    return None


@contextlib.contextmanager
def _deferred_sigint(enabled: bool):
    """While active (and enabled, on the main thread), Ctrl-C sets the yielded flag instead
    of raising KeyboardInterrupt."""
    flag = {"set": False}
    previous = None
    if enabled:
        try:
            previous = signal.signal(signal.SIGINT, lambda *_: flag.update(set=True))
        except ValueError:   # not the main thread: interrupts stay immediate
            previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class ChatLoop:
    def __init__(self, session: ChatSession, backend, stdin=None, stdout=None):
        self.session, self.backend = session, backend
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout

    def run(self) -> int:
        self._say(f"gateway chat with {self.backend.name}; {COMMANDS_HELP}. Ctrl-C stops a reply, Ctrl-D exits.")
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                self._say("")
                continue
            if line is None:   # EOF / Ctrl-D
                self._say("")
                return 0
            if not line.strip():
                continue
            command = parse_command(line)
            if command is None:
                self._reply(line.strip())
            elif not self._command(command):
                return 0

    def _read(self) -> str | None:
        if self.stdin is sys.stdin and self.stdout is sys.stdout and sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                importlib.import_module("readline")   # line editing and history for input()
            try:
                return input("> ")
            except EOFError:
                return None
        self._write("> ")   # a pipe: the marker tells a driving program we are waiting
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def _command(self, command: Command) -> bool:
        """Run a command; False means exit."""
        session = self.session
        try:
            if command.name == "exit":
                return False
            if command.name == "clear":
                session.clear()
                self._say("history cleared")
            elif command.name == "config":
                self._say("\n".join(session.config_lines()))
            elif command.name == "set":
                key, sep, value = command.arg.partition("=")
                if not sep:
                    raise ValueError("usage: config set key=value")
                session.set(key.strip(), value)
                self._say(f"{key.strip()} = {getattr(session.settings, key.strip())}")
            elif command.name == "history":
                self._say("\n".join(session.history_lines()))
            elif command.name == "revert_to":
                if not command.arg.isdigit():
                    raise ValueError(f"usage: revert_to N (a turn number from history), got {command.arg!r}")
                session.revert_to(int(command.arg))
                self._say(f"reverted: {len(session.turns)} turn(s) kept; the next message is turn {len(session.turns)}")
        except ValueError as exc:
            self._say(f"error: {exc}")
        return True

    def _reply(self, text: str) -> None:
        parts: list[str] = []
        interrupted = False
        deltas = None
        try:
            deltas = self.backend.stream(self.session.messages(text), self.session.settings)
            with _deferred_sigint(self.backend.defer_interrupts) as flag:
                for delta in deltas:
                    if delta:
                        self._write(delta)
                        parts.append(delta)
                    if flag["set"]:
                        interrupted = True
                        break
        except KeyboardInterrupt:
            interrupted = True
        except ChatError as exc:
            self._say(("\n" if parts else "") + f"error: {exc}")
            return
        finally:
            if deltas is not None:
                deltas.close()   # aborts an unfinished request
        self._write("\n")
        if interrupted:
            self._say("[interrupted]")
        if parts or not interrupted:
            self.session.add_turn(text, "".join(parts))

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _say(self, text: str) -> None:
        self._write(text + "\n")


@dataclass(frozen=True)
class ChatOptions:
    """`gateway chat`'s own options (cli.py fills them); the engine's are in the Config."""
    url: str | None = None            # an OpenAI-compatible server; None → an engine in-process
    api_key: str | None = None        # for url
    model_name: str | None = None     # the served model to ask (url); default: the first listed
    max_history: int | None = None    # turns kept; None → all
    temperature: float | None = None  # None → ChatSettings' default, as for the next two
    max_tokens: int | None = None
    system: str | None = None


def chat_command(config, options: ChatOptions) -> int:
    """`gateway chat`: config drives the in-process engine, options the chat itself."""
    session = ChatSession(max_history=options.max_history, temperature=options.temperature,
                          max_tokens=options.max_tokens, system=options.system)
    if options.url:
        backend = HttpBackend(options.url, options.api_key, options.model_name)
    else:
        from gateway.engine.llm import LLM   # heavy: torch, transformers
        backend = InProcessBackend(LLM(**config.__dict__))
    return ChatLoop(session, backend).run()
