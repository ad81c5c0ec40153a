"""orjson-encoded JSON responses."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type=JSON_CONTENT_TYPE,
        charset="utf-8",
    )


def json_bytes_response(body: bytes, status: int = 200) -> web.Response:
    """A body that is already JSON (built by SQLite for the large listings)."""
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE,
                        charset="utf-8")


def error_response(message: str, status: int) -> web.Response:
    return json_response({"status": False, "error": message}, status=status)
