"""Per-client state (current discussion, last message, generation flag), keyed by an opaque
random session id carried in a cookie. Bounded in number and expiring when idle.

The HTTP routes and, later, Socket.IO handlers (reading the same cookie from the connect
environ) look sessions up here, so one browser shares its state across both.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE_NAME = "lollms_session"
MAX_SESSIONS = 10_000
IDLE_TTL_S = 7 * 24 * 3600


@dataclass
class ClientSession:
    id: str
    discussion_id: int | None = None
    last_message_id: int | None = None
    generating: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    # set by the generation service while an answer runs; called by stop_gen
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def select(self, discussion_id: int | None, last_message_id: int | None) -> None:
        self.discussion_id = discussion_id
        self.last_message_id = last_message_id

    def request_stop(self) -> bool:
        """Ask this client's running generation(s) to stop; True if one was running."""
        callbacks = list(self.stop_callbacks)
        for cb in callbacks:
            cb()
        return bool(callbacks) or self.generating


class SessionStore:
    """LRU-bounded; a session idle for longer than `ttl` is forgotten."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, ttl: float = IDLE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._clock = clock
        self._sessions: OrderedDict[str, ClientSession] = OrderedDict()

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
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = ClientSession(secrets.token_urlsafe(24), last_seen=self._clock())
        self._sessions[session.id] = session
        return session

    def get_or_create(self, session_id: str | None) -> tuple[ClientSession, bool]:
        session = self.get(session_id)
        if session is not None:
            return session, False
        return self.create(), True

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self.ttl or oldest.generating:
                break
            self._sessions.popitem(last=False)

    def forget_discussion(self, discussion_id: int) -> None:
        """A discussion was deleted: no session keeps it as current."""
        for session in self._sessions.values():
            if session.discussion_id == discussion_id:
                session.select(None, None)
