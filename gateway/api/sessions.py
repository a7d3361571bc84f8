"""Server-side chat sessions: the conversation lives on the server, the client sends only
its new message, and the session's KV blocks stay pinned in the prefix cache between turns.

Routes (wired by app.build_app): POST /v1/sessions → {"id"}; POST /v1/sessions/{id}/chat (a
chat-completions body whose `messages` hold only the new user message(s), or {"content"});
GET /v1/sessions/{id}; POST /v1/sessions/{id}/revert {"turn": N}; DELETE /v1/sessions/{id}.
Unknown ids → 404, more than config.max_sessions → 429, a second chat or a revert while a
reply is being generated → 409.

One chat turn, in order: sweep expired sessions → parse (the session's system prompt and
turns + the new messages form the full conversation, validated as a chat request) → mark
the session busy → the pipeline of /v1/chat/completions (pipeline.py: tokenize, admit, run,
the chat shape) with a completion hook: once the reply is complete (stop or length; before
[DONE] when streaming), append {messages, reply} as one turn and pin the conversation's
tokens (encoded as the next turn will encode them) on the engine thread → release busy. An incomplete reply (abort, error, disconnect) records nothing.
Pins are released on delete, on revert (re-pinned to the kept prefix), on expiry after
config.session_ttl_s idle (a background sweep, and before every session request) and at
shutdown, so with no live session every KV block is free again."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.routing import Route

from gateway.api import protocol as P
from gateway.api.errors import APIError, invalid, json_response
from gateway.api.pipeline import Pipeline, guarded, read_json
from gateway.api.shapers import CHAT
from gateway.api.streaming import ChoiceState
from gateway.config import Config
from gateway.engine.client import EngineClient

log = logging.getLogger("gateway.api")
COMPLETE = ("stop", "length")


@dataclass
class Turn:
    messages: list[dict]     # the user message(s) of this turn
    reply: str


@dataclass
class Session:
    id: str
    system: str | None
    created: int
    last_used: float
    turns: list[Turn] = field(default_factory=list)
    busy: bool = False
    pinned_blocks: int = 0

    def messages(self, upto: int | None = None) -> list[dict]:
        """The conversation as chat messages, through turn upto - 1 (all turns by default)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns[:upto]:
            out += turn.messages + [{"role": "assistant", "content": turn.reply}]
        return out

    def describe(self, model: str) -> dict:
        turns = [{"turn": i, "messages": t.messages, "reply": t.reply} for i, t in enumerate(self.turns)]
        return {"id": self.id, "object": "chat.session", "created": self.created, "model": model,
                "system": self.system, "turns": turns, "pinned_blocks": self.pinned_blocks}


class SessionStore:
    """Live sessions and their pins. Event-loop side only; pins go through the engine inbox."""

    def __init__(self, engine: EngineClient, config: Config, clock=time.monotonic):
        self.engine, self.clock = engine, clock
        self.max_sessions, self.ttl_s = config.max_sessions, config.session_ttl_s
        self.sessions: dict[str, Session] = {}
        self._sweeper: asyncio.Task | None = None

    def create(self, system: str | None) -> Session:
        if len(self.sessions) >= self.max_sessions:
            raise APIError(429, f"too many live sessions ({self.max_sessions}); delete one or retry later",
                           code="too_many_sessions", headers={"Retry-After": "1"})
        session = Session(f"sess-{uuid.uuid4().hex}", system, int(time.time()), self.clock())
        self.sessions[session.id] = session
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever())
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise APIError(404, f"no session {session_id!r} (unknown, deleted or expired)",
                           param="id", code="session_not_found")
        return session

    def is_live(self, session: Session) -> bool:
        return self.sessions.get(session.id) is session

    async def delete(self, session_id: str) -> None:
        self.get(session_id)
        del self.sessions[session_id]
        await self._unpin(session_id)

    async def record(self, session: Session, messages: list[dict], reply: str) -> None:
        """Append a completed turn and pin the conversation through it."""
        if not self.is_live(session):   # deleted or expired while the reply was generated
            return
        session.turns.append(Turn(messages, reply))
        session.last_used = self.clock()
        await self.repin(session)

    async def revert(self, session: Session, turn: int) -> None:
        if not 0 <= turn < len(session.turns):
            raise invalid("turn", f"`turn` must name an existing turn, 0..{len(session.turns) - 1}; got {turn}")
        del session.turns[turn:]
        session.last_used = self.clock()
        await self.repin(session)

    async def repin(self, session: Session) -> None:
        """Pin the tokens the next turn's prompt will start with; nothing when no turn is left."""
        if not session.turns:
            session.pinned_blocks = 0
            await self._unpin(session.id)
            return
        tokens = self.engine.encode_chat(session.messages(), add_generation_prompt=False)
        try:
            session.pinned_blocks = await self.engine.pin_prefix(session.id, tokens)
        except Exception:   # a pin is an optimisation: the turn stands without it
            log.warning("pinning session %s failed", session.id, exc_info=True)

    async def sweep(self) -> None:
        deadline = self.clock() - self.ttl_s
        for session in [s for s in self.sessions.values() if s.last_used < deadline and not s.busy]:
            log.info("session %s expired after %.0f s idle", session.id, self.ttl_s)
            del self.sessions[session.id]
            await self._unpin(session.id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.ttl_s / 2, 30.0))
            try:
                await self.sweep()
            except Exception:
                log.warning("session sweep failed", exc_info=True)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session_id in list(self.sessions):
            del self.sessions[session_id]
            await self._unpin(session_id)

    async def _unpin(self, session_id: str) -> None:
        try:
            await self.engine.unpin_prefix(session_id)
        except Exception:   # a dead engine holds nothing any more
            log.debug("unpinning session %s failed", session_id, exc_info=True)


def _new_messages(body: dict) -> list[dict]:
    """The turn's new user message(s): body["messages"], or {"content": "..."}."""
    if ("content" in body) == ("messages" in body):
        raise invalid("messages", "send the new user message as `messages` or as `content` (exactly one)")
    if "content" in body:
        return [{"role": "user", "content": P.get(body, "content", "string", "")}]
    messages = P.parse_messages(body)
    for i, m in enumerate(messages):
        if m["role"] != "user":
            raise invalid(f"messages[{i}].role", "a session holds the history: send only new user messages")
    return messages


class SessionRoutes:
    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.engine, self.info = pipeline, pipeline.engine, pipeline.info
        self.store = SessionStore(pipeline.engine, pipeline.config)

    def routes(self) -> list[Route]:
        return [Route("/v1/sessions", self.create, methods=["POST"]),
                Route("/v1/sessions/{id}", self.describe, methods=["GET"]),
                Route("/v1/sessions/{id}", self.delete, methods=["DELETE"]),
                Route("/v1/sessions/{id}/chat", self.chat, methods=["POST"]),
                Route("/v1/sessions/{id}/revert", self.revert, methods=["POST"])]

    async def _session(self, request, idle: bool = False) -> Session:
        """The session named in the path; with idle=True, 409 while it generates a reply.
        Callers read the body first, so no await separates this check from their change."""
        await self.store.sweep()
        session = self.store.get(request.path_params["id"])
        if idle and session.busy:
            raise APIError(409, "this session is generating a reply; wait for it to finish",
                           code="session_busy")
        return session

    @guarded
    async def create(self, request):
        body = await read_json(request) if await request.body() else {}
        unknown = sorted(set(body) - {"system", "model"})
        if unknown:
            raise invalid(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}")
        self.pipeline.check_model(body)
        await self.store.sweep()
        session = self.store.create(P.get(body, "system", "string"))
        return json_response(session.describe(self.info.name))

    @guarded
    async def describe(self, request):
        return json_response((await self._session(request)).describe(self.info.name))

    @guarded
    async def delete(self, request):
        await self.store.sweep()
        await self.store.delete(request.path_params["id"])
        return json_response({"id": request.path_params["id"], "object": "chat.session.deleted", "deleted": True})

    @guarded
    async def revert(self, request):
        body = await read_json(request)
        session = await self._session(request, idle=True)
        turn = P.get(body, "turn", "integer")
        if turn is None or set(body) - {"turn"}:
            raise invalid("turn", "the body must be {\"turn\": N}")
        await self.store.revert(session, turn)
        return json_response(session.describe(self.info.name))

    @guarded
    async def chat(self, request):
        arrival, pipe = time.monotonic(), self.pipeline
        body = await read_json(request)
        session = await self._session(request, idle=True)
        new = _new_messages(body)
        full = {k: v for k, v in body.items() if k != "content"} | {"messages": session.messages() + new}
        req = P.parse_chat(full, self.info)
        if req.n != 1:
            raise invalid("n", "a session records one reply per turn: `n` must be 1")
        if req.tools is not None:   # a session records text turns; tool turns have no place in it yet
            name = next(f for f in ("tools", "tool_choice", "parallel_tool_calls") if body.get(f) is not None)
            raise invalid(name, f"`{name}` is not supported in sessions; use /v1/chat/completions",
                          code="unsupported_parameter")
        pipe.check_alive()
        session.busy = True   # before the first await: encoding a large prompt yields the loop
        try:
            prompt = await pipe.encode_chat(req.messages)
            job, ctx = pipe.admit(request, req, [prompt], "messages", arrival, "chatcmpl")
        except BaseException:
            session.busy = False
            raise

        async def record(states: list[ChoiceState]) -> None:
            if states[0].finish_reason in COMPLETE:   # an incomplete reply records nothing
                session.busy = False
                await self.store.record(session, new, "".join(states[0].text))

        return await pipe.run(request, req, job, ctx, CHAT, on_complete=record, on_exit=lambda: _release(session))


def _release(session: Session) -> None:
    session.busy = False
