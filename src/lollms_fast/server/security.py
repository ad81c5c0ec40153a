"""Defences against the web pages a user visits (SPEC section 7, docs/security.md).

- DNS rebinding: a request whose `Host` is not one of this server's names is refused (403),
  on every route including `/socket.io/`. A page on attacker.example that re-points its name
  at 127.0.0.1 keeps sending `Host: attacker.example`.
- CSRF: a request that changes state (any method but GET/HEAD/OPTIONS, and the 2023 GET
  routes marked `changes_state`) is refused (403) when it comes from another origin: its
  `Origin` names another origin not listed in `allowed_origins`, or, without `Origin`, the
  browser says `Sec-Fetch-Site: cross-site` or `same-site`. Scripts (curl, Python) send
  neither header and pass.
- Security headers on every response; a Content-Security-Policy on HTML pages.

Socket.IO keeps python-engineio's own same-origin check, which compares `Origin` with the
`Host` header: safe now that the Host is verified first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import psutil
from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from ..config import Config
from .middlewares import Handler
from .responses import error_for

_CHANGES_STATE = "__lollms_fast_changes_state__"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


def changes_state(handler: Handler) -> Handler:
    """Mark a GET route that changes state (the 2023 API has several): CSRF rules apply."""
    setattr(handler, _CHANGES_STATE, True)
    return handler


def _split_host(value: str) -> str | None:
    """The host name of a Host header, lower case, without port, brackets or final dot;
    None if it is not a well-formed host."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):  # [IPv6]:port
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            return None
        return value[1:end]
    host, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    host = host[:-1] if host.endswith(".") else host
    return host or None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class HostAllowList:
    """The names this server answers to: loopback names and addresses, the bind address,
    the machine's name (and, bound to every interface, its addresses), `allowed_hosts`."""

    def __init__(self, config: Config) -> None:
        extra = [h.strip() for h in config.allowed_hosts.split(",") if h.strip()]
        self.any = "*" in extra
        names = {h.lower().rstrip(".") for h in extra if h != "*"}
        names |= set(LOOPBACK_NAMES)
        bind = config.host.strip("[]").lower()
        if bind not in WILDCARD_BINDS:
            names.add(bind.rstrip("."))
        hostname = socket.gethostname().lower()
        if hostname:
            names |= {hostname, f"{hostname}.local"}
        self.names = frozenset(names)
        self.addresses = frozenset(self._addresses(bind in WILDCARD_BINDS, names))

    @staticmethod
    def _addresses(wildcard: bool, names: Iterable[str]
                   ) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        found = {ip for ip in (_ip(n) for n in names) if ip is not None}
        if wildcard:  # reachable on every interface: its addresses are its names too
            for addrs in psutil.net_if_addrs().values():
                for addr in addrs:
                    ip = _ip(addr.address.split("%")[0])
                    if ip is not None:
                        found.add(ip)
        return found

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # no browser omits Host; HTTP/1.0 scripts may
            return True
        host = _split_host(header)
        if host is None:
            return False
        ip = _ip(host)
        if ip is not None:
            mapped = getattr(ip, "ipv4_mapped", None)
            return ip.is_loopback or (mapped is not None and mapped.is_loopback) \
                or ip in self.addresses
        return host in self.names or host.endswith(".localhost")


def _origin_key(url: URL) -> tuple[str, str, int | None] | None:
    if not url.scheme or not url.host:
        return None
    return url.scheme.lower(), url.host.lower().rstrip("."), url.port


def forwarded_https(request: web.Request) -> bool:
    """A proxy in front (deploy/nginx.conf) says the browser came over HTTPS
    (`X-Forwarded-Proto: https`). Trusting it without knowing the proxy is safe for what it
    is used for: it only adds `https://<this Host>` as this server's own origin (a page
    elsewhere cannot send a custom header without a CORS preflight, which is refused), and
    marks the session cookie Secure (python-engineio's same-origin check reads the header
    the same way)."""
    value = request.headers.get("X-Forwarded-Proto", "")
    return value.split(",")[0].strip().lower() == "https"


def _same_origin(request: web.Request, origin: str) -> bool:
    """Does `origin` name this request's own origin (scheme, verified Host, port)? Behind a
    TLS proxy the browser's origin is https while this server speaks http."""
    try:
        theirs = _origin_key(URL(origin))
    except ValueError:
        return False
    schemes = {request.scheme, "https"} if forwarded_https(request) else {request.scheme}
    return theirs is not None and any(
        _origin_key(URL(f"{scheme}://{request.host}")) == theirs for scheme in schemes)


class OriginPolicy:
    def __init__(self, config: Config) -> None:
        listed = [o.strip() for o in config.allowed_origins.split(",") if o.strip()]
        self.any = "*" in listed
        self.listed = frozenset(k for k in (_origin_key(URL(o)) for o in listed if o != "*")
                                if k is not None)

    def lists(self, origin: str) -> bool:
        """Is `origin` one of `allowed_origins` (CORS answers only those)?"""
        try:
            return _origin_key(URL(origin)) in self.listed
        except ValueError:
            return False

    def allows(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is not None:
            return self.any or _same_origin(request, origin) or self.lists(origin)
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        return fetch_site not in ("cross-site", "same-site")


def security_middleware(config: Config) -> Middleware:
    hosts = HostAllowList(config)
    origins = OriginPolicy(config)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not hosts.allows(request.headers.get("Host")):
            return error_for(request, "this server does not answer to that host name (add "
                             "it to allowed_hosts)", 403)
        changing = request.method not in SAFE_METHODS or getattr(
            request.match_info.handler, _CHANGES_STATE, False)
        if changing and not request.path.startswith("/socket.io/") \
                and not origins.allows(request):
            return error_for(request, "cross-origin request refused (its origin is not in "
                             "allowed_origins)", 403)
        return await handler(request)

    return check


async def security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: headers every response carries; the CSP on HTML pages."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Frame-Options", "DENY")
