"""The web UI's pages and static files, and personality assets (SPEC section 1).

Files are served from one root each and only from it: every path component is checked
(no `..`, `.`, empty or hidden components, no backslashes), then the real path (symlinks
followed) must still be a regular file inside the real root. Anything else is a 404, so
a probe cannot tell "outside the root" from "missing". Percent-encoded forms (`%2e%2e/`,
`..%2f`) are decoded by aiohttp before the check, so they meet the same rule.

These routes are registered last; aiohttp matches the longest fixed prefix first, so the
catch-all never shadows `/socket.io/` or an API route.
"""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path

from aiohttp import web

from ..errors import NotFound
from .keys import PERSONALITIES, SETTINGS
from .middlewares import public

BUILTIN_UI = Path(__file__).resolve().parent.parent / "ui"
ENTRY_PAGE = "index.html"
# the single-page app answers on all of these (with or without a trailing slash)
PAGES = ("/", "/main", "/settings", "/help", "/training", "/extensions")

# the page must be revalidated (a new UI build shows up at once); assets may be cached a
# while and are revalidated by ETag / Last-Modified after that
HTML_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=3600"

_EXTRA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                ".json": "application/json", ".svg": "image/svg+xml", ".wasm": "application/wasm",
                ".webp": "image/webp", ".woff2": "font/woff2", ".map": "application/json",
                ".ico": "image/x-icon"}
_TEXT_TYPES = ("text/", "application/json", "application/javascript", "image/svg+xml")

routes = web.RouteTableDef()


def ui_root(ui_dir: str) -> Path:
    return Path(ui_dir).expanduser() if ui_dir else BUILTIN_UI


def content_type(path: Path) -> str:
    kind = (_EXTRA_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
            or "application/octet-stream")
    if kind.startswith(_TEXT_TYPES):
        kind += "; charset=utf-8"
    return kind


def safe_parts(relative: str) -> list[str] | None:
    """The path's components, or None if any could step out of (or hide in) the root."""
    parts = relative.split("/")
    for part in parts:
        if (part in ("", ".", "..") or part.startswith(".") or "\\" in part
                or any(ord(ch) < 32 for ch in part) or ":" in part):
            return None
    return parts


def contained_file(root: Path, parts: list[str]) -> Path | None:
    """root/parts if it is a regular file whose real path stays inside the real root."""
    try:
        real_root = root.resolve(strict=True)
        target = real_root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        return None
    if not target.is_relative_to(real_root) or not target.is_file():
        return None
    return target


def file_response(path: Path) -> web.FileResponse:
    response = web.FileResponse(path)
    response.headers["Content-Type"] = content_type(path)
    response.headers["Cache-Control"] = HTML_CACHE if path.suffix == ".html" else ASSET_CACHE
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def serve_from(roots: list[Path], relative: str) -> web.FileResponse:
    """The first root holding `relative`; NotFound otherwise."""
    parts = safe_parts(relative)
    if parts is not None:
        for root in roots:
            found = await asyncio.to_thread(contained_file, root, parts)
            if found is not None:
                return file_response(found)
    raise NotFound("file not found")


@public
async def page(request: web.Request) -> web.FileResponse:
    return await serve_from([ui_root(request.app[SETTINGS].config.ui_dir)], ENTRY_PAGE)


for _path in PAGES:
    routes.get(_path)(page)
    if _path != "/":
        routes.get(_path + "/")(page)


@routes.get("/personalities/{path:.+}")
@public
async def personality_asset(request: web.Request) -> web.FileResponse:
    """Only `<language>/<category>/<folder>/assets/...`: the rest of a personality folder
    (config, scripts, secrets) is not for the browser. The user's root wins over built-ins."""
    relative = request.match_info["path"]
    parts = relative.split("/")
    if len(parts) < 5 or parts[3] != "assets":
        raise NotFound("file not found")
    roots = list(reversed(request.app[PERSONALITIES].library.roots))
    return await serve_from(roots, relative)


@routes.get("/{filename:.+}")
@public
async def static_file(request: web.Request) -> web.FileResponse:
    root = ui_root(request.app[SETTINGS].config.ui_dir)
    return await serve_from([root], request.match_info["filename"])


# other routes that hold every path below a prefix (the /v1/ preflight and GET fallback)
CATCH_ALL_PATHS = frozenset({"/v1/{tail}"})


@routes.route("*", "/{filename:.+}")
@public
async def no_route(request: web.Request) -> web.StreamResponse:
    """Any other method on a path the catch-all holds. A path that some route serves with
    other methods is a 405 naming them (as aiohttp answers when no catch-all exists); any
    other path is not a route at all: 404, not the 405 the GET-only catch-all would give."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical in CATCH_ALL_PATHS:
            continue  # they answer every path below them; no route is named by that
        if resource is not request.match_info.route.resource:
            _match, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise NotFound("no such route")
