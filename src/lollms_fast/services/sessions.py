"""Per-client state (current discussion, last message, generation flag), keyed by an opaque
session id carried in a cookie. Bounded in number and expiring when idle.

The HTTP routes and the Socket.IO connect handler (from the handshake request) look
sessions up here, so one browser shares its state across both.

Ids are minted by the store: a random part and an HMAC of it under a secret that lives as
long as the process. Every client gets an id on its first response, before it has a session
(static files must not fill the LRU), and the entry is created when a route first needs it.
Only ids the store minted can create an entry that way, so a client cannot choose its id
(no session fixation with arbitrary ids); anything else is a fresh id.

Replicas (`socketio_redis_url`): a `SessionMirror` (services/cluster.py) gives every replica
the same secret, keeps each session's state in Redis (written on every change, read on every
`fetch`, so whichever replica a browser reaches knows its discussion), and carries `stop`
to the replica running the session's generation. Stop callbacks and the generating flag
stay in the process that runs the generation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

COOKIE_NAME = "lollms_session"
MAX_SESSIONS = 10_000
IDLE_TTL_S = 7 * 24 * 3600
_NONCE_BYTES = 18  # 24 url-safe characters
_TAG_BYTES = 16  # 22 url-safe characters


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class ClientSession:
    id: str
    discussion_id: int | None = None
    last_message_id: int | None = None
    generating: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    # set by the generation service while an answer runs; called by stop_gen
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    # told of every change of the state above (the store's mirror, with replicas)
    on_change: Callable[[ClientSession], None] | None = field(default=None, repr=False,
                                                                compare=False)
    changes: int = field(default=0, repr=False, compare=False)  # selects so far

    def select(self, discussion_id: int | None, last_message_id: int | None) -> None:
        self.discussion_id = discussion_id
        self.last_message_id = last_message_id
        self.changes += 1
        if self.on_change is not None:
            self.on_change(self)

    def request_stop(self) -> bool:
        """Ask this client's running generation(s) to stop; True if one was running."""
        callbacks = list(self.stop_callbacks)
        for cb in callbacks:
            cb()
        return bool(callbacks) or self.generating


class SessionMirror(Protocol):
    """Where sessions outlive this process and are shared with other replicas (Redis)."""

    secret: bytes

    def save_session(self, session_id: str, discussion_id: int | None,
                     last_message_id: int | None) -> None: ...

    async def flush(self) -> None: ...

    async def load_session(self, session_id: str
                           ) -> tuple[int | None, int | None] | None: ...

    async def publish(self, op: str, **fields: object) -> None: ...


class SessionStore:
    """LRU-bounded; a session idle for longer than `ttl` is forgotten."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, ttl: float = IDLE_TTL_S,
                 clock: Callable[[], float] = time.monotonic,
                 secret: bytes | None = None) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._clock = clock
        # per process unless a mirror gives the replicas' shared one: a restart forgets the
        # sessions, and their ids stop verifying with them
        self._secret = secret or secrets.token_bytes(32)
        self._sessions: OrderedDict[str, ClientSession] = OrderedDict()
        self.mirror: SessionMirror | None = None

    def attach(self, mirror: SessionMirror) -> None:
        """Share sessions with other replicas (before the first request is served)."""
        self.mirror = mirror

    def _mirrored(self, session: ClientSession) -> None:
        if self.mirror is not None:
            self.mirror.save_session(session.id, session.discussion_id,
                                     session.last_message_id)

    async def fetch(self, session_id: str | None) -> ClientSession:
        """`get_or_create`, and with a mirror the state other replicas (or this process
        before a restart) left for it: the shared state wins over this process's copy."""
        if self.mirror is None:
            return self.get_or_create(session_id)[0]
        await self.mirror.flush()  # this process's own last change is readable
        session, created = self.get_or_create(session_id)
        changes = session.changes
        stored = await self.mirror.load_session(session.id)
        if session.changes != changes:
            pass  # changed here while Redis answered: newer than what it answered
        elif stored is not None:
            session.discussion_id, session.last_message_id = stored
        elif not created and session.discussion_id is not None:
            self._mirrored(session)  # Redis lost it (restart, eviction): written again
        return session

    async def stop(self, session: ClientSession) -> bool:
        """stop_gen: this process's generations of the session stop; with replicas, the
        others are told too (the generation may run on the one that held the session
        before). True if one was running here."""
        stopped = session.request_stop()
        if self.mirror is not None:
            await self.mirror.publish("stop", session=session.id)
        return stopped

    def stop_local(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session.request_stop() if session is not None else False

    def _tag(self, nonce: str) -> str:
        # with replicas, the secret they share (which Redis may replace: cluster.py)
        secret = self.mirror.secret if self.mirror is not None else self._secret
        digest = hmac.new(secret, nonce.encode("ascii"), hashlib.sha256).digest()
        return _b64(digest[:_TAG_BYTES])

    def mint_id(self) -> str:
        """A new session id that `is_minted` accepts. Creates no session."""
        nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        return f"{nonce}.{self._tag(nonce)}"

    def is_minted(self, session_id: str) -> bool:
        """True if this store minted `session_id` (constant-time check of its tag)."""
        nonce, dot, tag = session_id.partition(".")
        if not dot or not nonce.isascii() or not tag.isascii():
            return False
        return hmac.compare_digest(tag, self._tag(nonce))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str | None) -> ClientSession | None:
        """The live session with that id (refreshing it), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.ttl and not session.generating:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def create(self) -> ClientSession:
        """A new session under a new id."""
        return self._add(self.mint_id())

    def get_or_create(self, session_id: str | None) -> tuple[ClientSession, bool]:
        """The live session with that id, else a new one (and True): under that id if this
        store minted it (the client already holds it as its cookie), under a new id
        otherwise (missing, forged or from another process)."""
        session = self.get(session_id)
        if session is not None:
            return session, False
        if session_id is None or not self.is_minted(session_id):
            session_id = self.mint_id()
        return self._add(session_id), True

    def _add(self, session_id: str) -> ClientSession:
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = ClientSession(session_id, last_seen=self._clock())
        if self.mirror is not None:
            session.on_change = self._mirrored
        self._sessions[session.id] = session
        return session

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self.ttl or oldest.generating:
                break
            self._sessions.popitem(last=False)

    async def discussion_deleted(self, discussion_id: int) -> None:
        """No session keeps a deleted discussion as current: this process's at once, and
        with replicas the others' too (a session only Redis still points at finds it gone,
        which every route treats as "none selected")."""
        self.forget_discussion(discussion_id)
        if self.mirror is not None:
            await self.mirror.publish("forget", discussion=discussion_id)

    def forget_discussion(self, discussion_id: int) -> None:
        """This process's part of `discussion_deleted` (also what another replica's
        message does here)."""
        for session in self._sessions.values():
            if session.discussion_id == discussion_id:
                session.select(None, None)
