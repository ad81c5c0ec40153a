"""The client's session on HTTP requests and Socket.IO handshakes.

SPEC "Sessions": the cookie is set on the first response a client gets, whatever it is (the
UI page, a static file, an error, a `/socket.io/` polling response), so that a page which
opens its socket before any API call shares one session with its later HTTP calls.

Every request has a session id (`session_id`): the one its cookie carries if the store
minted it, else a new one. `set_session_cookie` runs on `on_response_prepare`, just before
any response's headers leave (routes, middleware errors and 401s, aiohttp's own error pages,
streamed responses, the WebSocket upgrade), and sends a new id back as the cookie. The
session itself is created only when a route or the socket's connect handler asks for it
(`client_session`), so cookieless requests for static files cost no store entry.
"""

from __future__ import annotations

from http.cookies import SimpleCookie

from aiohttp import hdrs, web

from ..services.sessions import COOKIE_NAME, IDLE_TTL_S, ClientSession, SessionStore
from .keys import SESSIONS
from .security import forwarded_https

_SESSION_ID = web.RequestKey("session_id", str)
_ISSUED = web.RequestKey("session_id_issued", bool)  # new: the response must carry it back


def session_id(request: web.Request) -> str:
    """This client's session id: its cookie's if the server minted it, else a new one that
    this request's response sets as the cookie. The same id for the life of the request."""
    if _SESSION_ID in request:
        return request[_SESSION_ID]
    sessions: SessionStore = request.app[SESSIONS]
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie and sessions.is_minted(cookie):
        request[_SESSION_ID] = cookie
        return cookie
    minted = sessions.mint_id()
    request[_SESSION_ID] = minted
    request[_ISSUED] = True
    return minted


async def client_session(request: web.Request) -> ClientSession:
    """This client's session (a new one if it has none yet, or it expired); with replicas,
    with the state the shared store holds for it."""
    return await request.app[SESSIONS].fetch(session_id(request))


def cookie_header(value: str, *, secure: bool) -> str:
    """The `Set-Cookie` value carrying a session id."""
    jar: SimpleCookie = SimpleCookie()
    jar[COOKIE_NAME] = value
    morsel = jar[COOKIE_NAME]
    morsel["max-age"] = IDLE_TTL_S
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def _socket_behind_proxy(request: web.Request) -> bool:
    """With replicas, an Engine.IO request without a cookie gets none: the proxy routes a
    cookieless client by its address and one with the cookie by the cookie, so a cookie
    minted on the handshake would send the next poll of the same connection to another
    replica, which does not know it. Such a socket (a script; a browser has loaded the page
    first and has its cookie) keeps a session for the life of its connection."""
    return (request.app[SESSIONS].mirror is not None
            and request.path.startswith("/socket.io/"))


async def set_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a client without a valid cookie receives its id. A client
    that sent a valid one is not sent it again. (The header is added directly: aiohttp has
    already turned `response.cookies` into headers when this signal runs.)"""
    session_id(request)
    if request.get(_ISSUED) and not _socket_behind_proxy(request):
        response.headers.add(hdrs.SET_COOKIE,
                             cookie_header(request[_SESSION_ID],
                                           secure=request.secure or forwarded_https(request)))
