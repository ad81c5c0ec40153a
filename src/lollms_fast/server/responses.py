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


OPENAI_PREFIX = "/v1/"

# HTTP status -> the OpenAI error `type`
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
                 413: "invalid_request_error", 415: "invalid_request_error",
                 429: "rate_limit_error"}


def openai_error(message: str, status: int, *, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, the shape OpenAI clients parse."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else
                             "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error_response(message: str, status: int, *, param: str | None = None,
                          code: str | None = None) -> web.Response:
    return json_response(openai_error(message, status, param=param, code=code), status=status)


def error_for(request: web.Request, message: str, status: int, *, param: str | None = None,
              code: str | None = None) -> web.Response:
    """An error in the shape the route's clients expect: OpenAI's under /v1/, lollms's
    `{"status": false, "error"}` everywhere else."""
    if request.path.startswith(OPENAI_PREFIX):
        return openai_error_response(message, status, param=param, code=code)
    return error_response(message, status)
