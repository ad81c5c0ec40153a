"""The Socket.IO server (Engine.IO 4 / Socket.IO 5) attached at /socket.io/."""

from __future__ import annotations

import logging
from typing import Any

import socketio

from ..config import Config
from .middlewares import key_matches, presented_key

log = logging.getLogger("lollms_fast.socketio")


def allowed_origins(config: Config) -> list[str] | str | None:
    """None = same origin only (python-socketio's default check); '*' = anyone."""
    raw = [o.strip() for o in config.allowed_origins.split(",") if o.strip()]
    if "*" in raw:
        return "*"
    if not raw:
        return None
    return raw


def create_socketio(config: Config) -> socketio.AsyncServer:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        cors_allowed_origins=allowed_origins(config),
        ping_interval=15,
        ping_timeout=60,
        max_http_buffer_size=config.max_body_size,
        logger=False,
        engineio_logger=False,
    )

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        expected = config.api_key
        if expected:
            presented = ""
            if isinstance(auth, dict):
                presented = str(auth.get("api_key", ""))
            request = environ.get("aiohttp.request")
            if not presented and request is not None:
                presented = presented_key(request)
            if not key_matches(expected, presented):
                log.info("refused Socket.IO connection %s: missing or wrong API key", sid)
                return False
        log.debug("socket connected %s", sid)
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        log.debug("socket disconnected %s", sid)

    return sio
