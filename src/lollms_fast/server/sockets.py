"""The Socket.IO server (Engine.IO 4 / Socket.IO 5) attached at /socket.io/, and its events.

A connection belongs to the session of its Engine.IO handshake request: the cookie the
browser sent with it, or the new one set on that request's response (polling or WebSocket
upgrade, `server/session.py`), so a page and its socket share one current discussion even
when the socket is the page's first contact. A client that keeps no cookie (a script) gets
a session of its own for the life of the connection. Every reply goes to the requesting
connection only (`to=sid`), never broadcast.

Streaming mode: by default `message.data` is the whole answer so far (what the 2023 UI
expects). A client that connects with the query parameter `stream=delta` (or the auth
field `{"stream": "delta"}`) receives only the new text in each `message` event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import socketio
from aiohttp import web

from ..config import Config
from ..services.cluster import SOCKETIO_CHANNEL
from ..services.sessions import ClientSession
from .keys import CHAT, MODELS, SESSIONS, SETTINGS
from .middlewares import key_matches, presented_key
from .session import client_session

if TYPE_CHECKING:
    from ..engine.scheduler import Generation

log = logging.getLogger("lollms_fast.socketio")


class OrjsonModule:
    """python-socketio takes a `json` module with dumps/loads; orjson is several times
    faster on the per-piece `message` frames."""

    @staticmethod
    def dumps(obj: Any, **_: Any) -> str:
        return orjson.dumps(obj).decode("utf-8")

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        return orjson.loads(data)


@dataclass
class Connection:
    session: ClientSession
    delta: bool
    generations: set[Generation] = field(default_factory=set)


def _without_compression(sio: socketio.AsyncServer) -> None:
    """Serve WebSockets without permessage-deflate. Browsers and aiohttp clients ask for it,
    and aiohttp would then zlib every frame: one per streamed piece, CPU taken from
    llama.cpp's threads for frames of a few dozen bytes. python-engineio builds its aiohttp
    WebSocket from its driver table; ours differs only in `compress=False`."""
    drivers = getattr(sio.eio, "_async", None)
    if not isinstance(drivers, dict) or drivers.get("websocket") is None:
        return
    base = drivers["websocket"]

    class PlainWebSocket(base):  # type: ignore[misc, valid-type]
        async def __call__(self, environ: dict[str, Any]) -> web.WebSocketResponse:
            request = environ["aiohttp.request"]
            self._sock = web.WebSocketResponse(
                max_msg_size=self.server.max_http_buffer_size, compress=False)
            await self._sock.prepare(request)
            self.environ = environ
            await self.handler(self)
            return self._sock

    sio.eio._async = {**drivers, "websocket": PlainWebSocket}


def allowed_origins(config: Config) -> list[str] | str | None:
    """None = same origin only (python-socketio's default check); '*' = anyone."""
    raw = [o.strip() for o in config.allowed_origins.split(",") if o.strip()]
    if "*" in raw:
        return "*"
    if not raw:
        return None
    return raw


def wants_delta(environ: dict[str, Any], auth: Any) -> bool:
    if isinstance(auth, dict) and auth.get("stream") == "delta":
        return True
    query = parse_qs(environ.get("QUERY_STRING", ""))
    return "delta" in query.get("stream", [])


def create_socketio(config: Config, app: web.Application, *, redis_url: str | None = None
                    ) -> socketio.AsyncServer:
    """The Socket.IO server, its lollms events served from `app`'s services. With
    `redis_url` (replicas), python-socketio's Redis manager carries emits to clients
    connected to other processes; the streamed pieces are sent to this process's own
    connections directly (`emitter`) and never touch Redis."""
    manager = (socketio.AsyncRedisManager(redis_url, channel=SOCKETIO_CHANNEL)
               if redis_url else None)
    sio = socketio.AsyncServer(
        client_manager=manager,
        async_mode="aiohttp",
        cors_allowed_origins=allowed_origins(config),
        ping_interval=15,
        ping_timeout=60,
        max_http_buffer_size=config.max_body_size,
        json=OrjsonModule,
        logger=False,
        engineio_logger=False,
    )
    _without_compression(sio)
    connections: dict[str, Connection] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        expected = config.api_key
        request = environ.get("aiohttp.request")
        if expected:
            presented = ""
            if isinstance(auth, dict):
                presented = str(auth.get("api_key", ""))
            if not presented and request is not None:
                presented = presented_key(request)
            if not key_matches(expected, presented):
                log.info("refused Socket.IO connection %s: missing or wrong API key", sid)
                return False
        session = (await client_session(request) if request is not None
                   else app[SESSIONS].create())
        connections[sid] = Connection(session, wants_delta(environ, auth))
        log.debug("socket connected %s", sid)
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        conn = connections.pop(sid, None)
        if conn is not None:
            for generation in list(conn.generations):
                generation.cancel()  # the chat service saves the partial answer
        app[MODELS].cancel_owner(sid)  # its downloads stop and leave nothing behind
        log.debug("socket disconnected %s", sid)

    def emitter(sid: str) -> Any:
        async def emit(event: str, payload: dict[str, Any]) -> None:
            # The hot path (one `message` per generated piece): the Socket.IO EVENT packet
            # (`2` + JSON array, default namespace, no binary, no ack) is encoded once here
            # and handed to Engine.IO for this one connection. `sio.emit` would create a
            # task per recipient and `asyncio.wait` it: several times the CPU per piece,
            # and on a 2-core machine event-loop CPU is taken from llama.cpp's threads.
            eio_sid = sio.manager.eio_sid_from_sid(sid, "/")
            if eio_sid is not None:  # None: the client has gone
                await sio.eio.send(eio_sid, "2" + orjson.dumps([event, payload]).decode())
        return emit

    def tracker(sid: str, conn: Connection) -> Any:
        def on_start(generation: Generation) -> None:
            conn.generations.add(generation)
            if connections.get(sid) is not conn:  # disconnected while it was being set up
                generation.cancel()
        return on_start

    async def run_generation(sid: str, data: Any, regenerate: bool) -> None:
        conn = connections.get(sid)
        if conn is None:
            return
        body = data if isinstance(data, dict) else {}
        chat = app[CHAT]
        before = set(conn.generations)
        try:
            if regenerate:
                await chat.generate_msg_from(conn.session, emitter(sid), body.get("id"),
                                             body.get("prompt"), delta=conn.delta,
                                             on_start=tracker(sid, conn))
            else:
                await chat.generate_msg(conn.session, emitter(sid), body.get("prompt"),
                                        delta=conn.delta, on_start=tracker(sid, conn))
        finally:
            conn.generations.intersection_update(before)

    @sio.event
    async def generate_msg(sid: str, data: Any = None) -> None:
        await run_generation(sid, data, regenerate=False)

    @sio.event
    async def generate_msg_from(sid: str, data: Any = None) -> None:
        await run_generation(sid, data, regenerate=True)

    async def stop(sid: str, *args: Any) -> None:
        conn = connections.get(sid)
        if conn is not None:
            await app[SESSIONS].stop(conn.session)

    sio.on("stop_gen", stop)
    sio.on("cancel_generation", stop)

    @sio.event
    async def update_setting(sid: str, data: Any = None) -> None:
        reply = await app[SETTINGS].update_setting_reply(data)
        await sio.emit("update_setting", reply, to=sid)

    @sio.event
    async def save_settings(sid: str, *args: Any) -> None:
        reply = await app[SETTINGS].save_reply()
        await sio.emit("save_settings", reply, to=sid)

    def progress_to(sid: str) -> Any:
        async def report(payload: dict[str, Any]) -> None:
            await sio.emit("install_progress", payload, to=sid)
        return report

    @sio.event
    async def install_model(sid: str, data: Any = None) -> None:
        await app[MODELS].install(data, progress_to(sid), owner=sid)

    @sio.event
    async def uninstall_model(sid: str, data: Any = None) -> None:
        await app[MODELS].uninstall(data, progress_to(sid))

    return sio
