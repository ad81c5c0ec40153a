"""Strict parsing of request bodies and query strings (BadRequest on anything wrong)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from ..parsing import parse_int, parse_json_object

__all__ = ["parse_int", "query_int", "query_str", "read_json_object", "read_limited",
           "require_field", "require_id"]


def require_json_type(request: web.Request) -> None:
    """JSON bodies must say so (`application/json` or `*/*+json`): a cross-site HTML form or
    a `text/plain` fetch cannot, and a 415 answers them before the body is read."""
    kind = request.content_type.lower()
    if kind != "application/json" and not (kind.startswith("application/")
                                           and kind.endswith("+json")):
        raise UnsupportedMediaType(f"the body must be JSON sent as application/json, "
                                   f"not {kind or 'untyped'}")


async def read_limited(request: web.Request, limit: int) -> bytes:
    """A JSON body of at most `limit` bytes, for the routes allowed more than the app-wide
    `max_body_size` (imports); 413 as soon as it is known to be larger."""
    require_json_type(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    require_json_type(request)
    return parse_json_object(await request.read())  # read: 413 past client_max_size


def query_str(request: web.Request, name: str, *, required: bool = True) -> str | None:
    value = request.query.get(name)
    if value is None and required:
        raise BadRequest(f"query parameter {name!r} is required")
    return value


def query_int(request: web.Request, name: str) -> int:
    raw = query_str(request, name)
    assert raw is not None
    return parse_int(name, raw)


def require_field(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """data[name], checked to be of `kind` (a bool never passes for an int)."""
    if name not in data:
        raise BadRequest(f"field {name!r} is required")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BadRequest(f"field {name!r} has the wrong type")
    return value


def require_id(data: dict[str, Any], name: str = "id") -> int:
    """An id field of a JSON body: an integer, or a decimal string (the 2023 UI sent both)."""
    return parse_int(name, require_field(data, name, (int, str)))
