"""`gateway chat` driven as a subprocess through a pipe, in-process and against a live
`gateway serve` (--url), with a tiny random model whose 4096-token context lets an
unbounded greedy reply run for many seconds: long enough to interrupt it with SIGINT."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from conftest import make_tiny_model
from server_process import ServerProcess

pytestmark = pytest.mark.timeout(600)
CONTEXT = 4096


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", default_model_dir,
                           max_position_embeddings=CONTEXT)


def gateway_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


class ChatProcess:
    """A `gateway chat` subprocess: lines in through stdin, stdout collected by a thread."""

    def __init__(self, *args):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(gateway_cmd("chat", *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.output = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def send(self, line: str) -> int:
        """Write one line; returns the output length before it, to search from."""
        mark = len(self.text)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return mark

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern in self.text[start:]:
                return self.text[start:]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        self.stderr.seek(0)
        pytest.fail(f"no {pattern!r} in the chat output:\n{self.text[start:][-3000:]}\n"
                    f"stderr:\n{self.stderr.read().decode()[-3000:]}")

    def ask(self, line: str, expect: str = "\n> ") -> str:
        """Send a line and return what the chat printed until its next prompt marker."""
        start = self.send(line)
        return self.wait_for(expect, start)

    def interrupt_a_long_reply(self, line: str) -> str:
        start = self.send(line)
        deadline = time.monotonic() + 240
        while len(self.text) - start < 40 and time.monotonic() < deadline:   # the reply is streaming
            time.sleep(0.02)
        assert "\n> " not in self.text[start:], "the reply ended before it could be interrupted"
        self.proc.send_signal(signal.SIGINT)
        return self.wait_for("[interrupted]\n> ", start)

    def finish(self, timeout: float = 60) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_every_command_through_a_pipe(tiny_dir):
    script = ["first message", "history", "config set temperature=abc", "config set bogus=1",
              "config set top_p=2", "config set system=You are terse.", "config", "second message",
              "revert_to 1", "revert_to 5", "third message", "history", "clear", "history", "exit",
              "never answered"]
    done = subprocess.run(gateway_cmd("chat", str(tiny_dir), "--max-tokens", "6", "--temperature", "0"),
                          input="\n".join(script) + "\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    streamed_then_listed = re.search(r"\n> (.+?)\n> \[0\] user: first message\n\[0\] assistant: \1\n> ", out, re.S)
    assert streamed_then_listed, out[:2000]
    for message in ["error: temperature must be a finite number, got 'abc'",
                    "error: unknown setting 'bogus'", "error: top_p must be in (0, 1]",
                    "system = You are terse.", "temperature = 0.0", "max_tokens = 6",
                    "reverted: 1 turn(s) kept; the next message is turn 1",
                    "error: revert_to: no turn 5; the history has turns 0..0", "history cleared"]:
        assert message in out
    after_revert = out.split("reverted:", 1)[1]
    assert "[1] user: third message" in after_revert and "second message" not in after_revert
    assert out.endswith("(no turns yet)\n> ")                     # nothing after `exit` was read


def test_interrupt_stops_the_reply_and_history_is_trimmed(tiny_dir):
    chat = ChatProcess(str(tiny_dir), "--temperature", "0", "--max-history", "2")
    chat.wait_for("> ")
    chat.ask("config set max_tokens=3")
    chat.ask("one")
    chat.ask("two")
    chat.ask("config set max_tokens=none")
    started = time.monotonic()
    chat.interrupt_a_long_reply("tell me a long story")
    assert time.monotonic() - started < 60
    history = chat.ask("history")
    assert "[0] user: two" in history and "[1] user: tell me a long story" in history
    assert "user: one" not in history
    assert chat.finish() == 0                                     # EOF exits cleanly


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess([str(tiny_dir), "--api-key", "sesame"], start_timeout_s=300, stop_timeout_s=30) as proc:
        yield proc.url


def aborted_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(r'^gateway:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow   # starts a server
def test_url_mode_streams_from_a_server_and_ctrl_c_aborts_the_request(server):
    chat = ChatProcess("--url", server, "--api-key", "sesame", "--temperature", "0")
    assert "gateway chat with llama" in chat.wait_for("> ")      # the model name came from /v1/models
    chat.ask("config set max_tokens=5")
    reply = chat.ask("hello").split("\n> ")[0]
    assert reply.strip() and f"[0] assistant: {reply}\n" in chat.ask("history")
    assert "error: HTTP 400" in chat.ask("config set max_tokens=100000") + chat.ask("too long")
    chat.ask("config set max_tokens=none")
    before = aborted_requests(server)
    chat.interrupt_a_long_reply("tell me a long story")
    deadline = time.monotonic() + 20
    while aborted_requests(server) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted_requests(server) == before + 1                 # the server saw the abort
    assert "[1] user: tell me a long story" in chat.ask("history")
    chat.send("exit")
    assert chat.finish() == 0


@pytest.mark.slow   # starts a server
def test_url_mode_without_the_api_key_is_refused_at_start(server):
    done = subprocess.run(gateway_cmd("chat", "--url", server), capture_output=True, text=True, timeout=120,
                          input="hello\n", env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"})
    assert done.returncode == 2 and "HTTP 401" in done.stderr
