"""The client's session on HTTP requests: looked up from its cookie, created on first use,
and the cookie set on the response by `session_middleware`."""

from __future__ import annotations

from aiohttp import web

from ..services.sessions import COOKIE_NAME, IDLE_TTL_S, ClientSession
from .keys import SESSIONS
from .middlewares import Handler

_NEW_SESSION = web.RequestKey("new_session", str)


def client_session(request: web.Request) -> ClientSession:
    """This client's session (a new one if its cookie is missing, unknown or expired)."""
    session, created = request.app[SESSIONS].get_or_create(request.cookies.get(COOKIE_NAME))
    if created:
        request[_NEW_SESSION] = session.id
    return session


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    new_id = request.get(_NEW_SESSION)
    if new_id is not None and not response.prepared:
        response.set_cookie(COOKIE_NAME, new_id, max_age=IDLE_TTL_S, path="/",
                            httponly=True, samesite="Lax", secure=request.secure)
    return response
