"""Middlewares: JSON errors (never a traceback to the client), API key, request log."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import LollmsError
from .keys import SETTINGS
from .responses import error_for

log = logging.getLogger("lollms_fast.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LollmsError as exc:
        return error_for(request, exc.message, exc.status, param=exc.param, code=exc.code)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.empty_body:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = error_for(request, reason, exc.status)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_for(request, "internal server error", 500)


def presented_key(request: web.Request) -> str:
    """The key a request carries: `Authorization: Bearer`, `X-API-Key`, or the web UI's
    same-site cookie. Never the query string (URLs end up in logs and browser history)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key") or request.cookies.get("lollms_api_key") or ""


def key_matches(expected: str, presented: str) -> bool:
    """Constant-time comparison; a header that is not valid text simply does not match."""
    try:
        given = presented.encode("utf-8")
    except UnicodeEncodeError:  # undecodable header bytes arrive as lone surrogates
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given)


SOCKETIO_PREFIX = "/socket.io/"


_PUBLIC = "__lollms_fast_public__"


def public(handler: Handler) -> Handler:
    """Mark a route as served without the API key: the web UI's page and static files carry
    no data, and a browser must load them before it can ask its user for the key."""
    setattr(handler, _PUBLIC, True)
    return handler


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[SETTINGS].config.api_key
    # Socket.IO checks the key in its connect handler (clients send it in the `auth` payload)
    if (expected and not request.path.startswith(SOCKETIO_PREFIX)
            and not getattr(request.match_info.handler, _PUBLIC, False)
            and not key_matches(expected, presented_key(request))):
        return error_for(request, "missing or wrong API key", 401, code="invalid_api_key")
    return await handler(request)


access_log = logging.getLogger("lollms_fast.access")


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request with `access_log` (or debug logging): client, method, path,
    status, time. Never the query string (it may carry message text), headers (keys) or
    bodies."""
    config = request.app[SETTINGS].config
    if not (config.access_log or log.isEnabledFor(logging.DEBUG)):
        return await handler(request)
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        access_log.info("%s %s %s %d %.1fms", request.remote or "-", request.method,
                        request.path, status, (time.perf_counter() - start) * 1000)
