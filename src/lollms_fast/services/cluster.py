"""What replicas share through Redis (`socketio_redis_url`), besides python-socketio's own
`AsyncRedisManager` (which carries Socket.IO emits between processes):

- the session secret, so that a session cookie minted by one replica verifies on every other
  (`SET NX` once, read by all);
- the browser sessions' state (current discussion, last message), one key per session with the
  idle TTL, so that a replica that restarts, or takes over a dead one's clients, knows which
  discussion a browser had open;
- a control channel (pub/sub): `stop` (stop_gen reaches a generation running on another
  replica), `forget` (a deleted discussion is no session's current one anywhere) and
  `settings` / `save` (a settings change made through one replica is applied, and saved, by
  every replica).

Session writes are queued and written in order by one task (a route never waits on Redis to
change a session); a read first waits for this process's queued writes, so a client always
reads what it just wrote. If Redis becomes unreachable, sessions fall back to this process's
memory and the control messages are lost until it returns (logged, rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..errors import LollmsError
from ..storage import redact_url
from .sessions import IDLE_TTL_S, SessionStore
from .settings import SettingsService

log = logging.getLogger("lollms_fast.cluster")

PREFIX = "lollms_fast:"
SECRET_KEY = PREFIX + "session_secret"
SESSION_KEY = PREFIX + "session:"
CONTROL_CHANNEL = PREFIX + "control"
SOCKETIO_CHANNEL = PREFIX + "socketio"
_WARN_EVERY_S = 30.0
SECRET_CHECK_S = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class ClusterError(LollmsError):
    """Redis is unreachable at start-up (the server refuses to start without it)."""


class Cluster:
    """One per process. `await start()` before serving, `await close()` at shutdown."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.origin = uuid.uuid4().hex  # control messages from this process are skipped
        self._redis: Any = None
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._writes: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._handlers: dict[str, Handler] = {}
        self._last_warning = 0.0
        self.secret = b""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            from redis import asyncio as aioredis
        except ImportError:
            raise ClusterError("socketio_redis_url needs the redis package: "
                               "pip install 'lollms-fast[replicas]'") from None
        self._redis = aioredis.Redis.from_url(self.url, socket_connect_timeout=5,
                                              health_check_interval=30)
        try:
            await self._redis.ping()
            # the first replica to start picks the secret; every other one reads it
            await self._redis.set(SECRET_KEY, secrets.token_bytes(32), nx=True)
            secret = await self._redis.get(SECRET_KEY)
        except Exception as exc:
            await self._redis.aclose()
            raise ClusterError(f"cannot reach Redis at {redact_url(self.url)}: "
                               f"{type(exc).__name__}: {exc}") from None
        self.secret = bytes(secret)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(CONTROL_CHANNEL)
        self._listener = asyncio.create_task(self._listen(), name="cluster-listener")
        self._writer = asyncio.create_task(self._write_sessions(), name="cluster-writer")
        self._keeper = asyncio.create_task(self._keep_secret(), name="cluster-secret")
        log.info("replica %s joined the cluster at %s", self.origin[:8], redact_url(self.url))

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._writes.join(), 2)
        except asyncio.TimeoutError:
            log.warning("%d session writes to Redis were not done at shutdown",
                        self._writes.qsize())
        for task in (self._listener, self._writer, self._keeper):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("Redis: %s failed (%s: %s); sessions use this process's memory "
                        "until it is back", what, type(exc).__name__, exc)

    async def _keep_secret(self) -> None:
        """Redis may lose the secret (restarted without persistence, flushed): this replica
        puts its own back, so that a replica starting later takes the same one, and if
        another value is there (another replica put it first), adopts it, so that every
        replica converges on one secret within SECRET_CHECK_S. Cookies minted under a
        secret given up no longer verify: those browsers get a new session."""
        while True:
            await asyncio.sleep(SECRET_CHECK_S)
            try:
                await self._redis.set(SECRET_KEY, self.secret, nx=True)
                current = await self._redis.get(SECRET_KEY)
            except Exception as exc:
                self._warn("checking the session secret", exc)
                continue
            if current is not None and bytes(current) != self.secret:
                log.warning("the session secret in Redis changed (Redis lost its data?): "
                            "adopted; sessions signed with the old one start afresh")
                self.secret = bytes(current)

    # ------------------------------------------------------------------ sessions

    def save_session(self, session_id: str, discussion_id: int | None,
                     last_message_id: int | None) -> None:
        """Queue a session's state for Redis (written in order by one task)."""
        self._writes.put_nowait(
            (SESSION_KEY + session_id, orjson.dumps([discussion_id, last_message_id])))

    async def flush(self) -> None:
        """Wait until every session write queued so far is done (or has failed)."""
        await self._writes.join()

    async def load_session(self, session_id: str
                           ) -> tuple[int | None, int | None] | None:
        """(discussion id, last message id) stored for that session, refreshing its TTL;
        None if Redis has none (or cannot be reached)."""
        try:
            raw = await self._redis.getex(SESSION_KEY + session_id, ex=IDLE_TTL_S)
        except Exception as exc:
            self._warn("reading a session", exc)
            return None
        if raw is None:
            return None
        try:
            discussion_id, last_message_id = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        ok = all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                 for v in (discussion_id, last_message_id))
        return (discussion_id, last_message_id) if ok else None

    async def _write_sessions(self) -> None:
        while True:
            key, value = await self._writes.get()
            try:
                await self._redis.set(key, value, ex=IDLE_TTL_S)
            except Exception as exc:
                self._warn("saving a session", exc)
            finally:
                self._writes.task_done()

    # ------------------------------------------------------------------ control channel

    def on(self, op: str, handler: Handler) -> None:
        """Run `handler(message)` for every `op` message another replica publishes."""
        self._handlers[op] = handler

    async def publish(self, op: str, **fields: Any) -> None:
        message = orjson.dumps({"op": op, "origin": self.origin, **fields})
        try:
            await self._redis.publish(CONTROL_CHANNEL, message)
        except Exception as exc:
            self._warn(f"publishing {op!r}", exc)

    async def _listen(self) -> None:
        while True:
            try:
                async for item in self._pubsub.listen():
                    await self._dispatch(item.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn("listening to the control channel", exc)
                await asyncio.sleep(1.0)
                try:  # a new connection re-subscribes
                    await self._pubsub.subscribe(CONTROL_CHANNEL)
                except Exception:
                    pass

    async def _dispatch(self, data: Any) -> None:
        try:
            message = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError):
            return
        if not isinstance(message, dict) or message.get("origin") == self.origin:
            return
        handler = self._handlers.get(str(message.get("op")))
        if handler is None:
            return
        try:
            await handler(message)
        except Exception:
            log.exception("control message %r failed", message.get("op"))


def join(cluster: Cluster, sessions: SessionStore, settings: SettingsService) -> None:
    """Wire this process's sessions and settings to the other replicas (after `start`)."""
    sessions.attach(cluster)

    async def on_stop(message: dict[str, Any]) -> None:
        session_id = message.get("session")
        if isinstance(session_id, str) and sessions.stop_local(session_id):
            log.info("stopped a generation at another replica's request")

    async def on_forget(message: dict[str, Any]) -> None:
        discussion_id = message.get("discussion")
        if isinstance(discussion_id, int):
            sessions.forget_discussion(discussion_id)

    async def on_settings(message: dict[str, Any]) -> None:
        changes = message.get("changes")
        if isinstance(changes, dict):
            await settings.apply_remote(changes)

    async def on_save(_message: dict[str, Any]) -> None:
        await settings.save()

    cluster.on("stop", on_stop)
    cluster.on("forget", on_forget)
    cluster.on("settings", on_settings)
    cluster.on("save", on_save)

    async def share_changes(changes: dict[str, Any]) -> None:
        await cluster.publish("settings", changes=changes)

    async def share_save() -> None:
        await cluster.publish("save")

    settings.on_applied = share_changes
    settings.on_saved = share_save
