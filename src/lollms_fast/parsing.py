"""Strict parsing shared by the routes and services: integers and ids from requests, bodies
and settings, and JSON object bodies."""

from __future__ import annotations

import re
from typing import Any

import orjson

from .errors import BadRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT_TEXT = re.compile(r"-?[0-9]{1,19}", re.ASCII)


def parse_int(name: str, value: Any, *, lo: int = INT64_MIN, hi: int = INT64_MAX,
              text: bool = True) -> int:
    """An integer, or its plain decimal text (query strings, and ids in bodies: the 2023 UI
    sent both) unless `text` is False (a document whose numbers must be JSON numbers).
    Booleans, floats, other text and values outside [lo, hi] are a BadRequest naming `name`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif text and isinstance(value, str) and _INT_TEXT.fullmatch(value):
        result = int(value)
    else:
        raise BadRequest(f"{name} must be an integer, got {value!r}"[:200])
    if not lo <= result <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {result}")
    return result


def parse_id(name: str, value: Any) -> int:
    """A row id: a non-negative 64-bit integer (or its decimal text)."""
    return parse_int(name, value, lo=0)


def check_text(name: str, value: str) -> str:
    """Text a user sends to be stored: it must not hold U+0000, which PostgreSQL text cannot
    store (SQLite could). Refused for every store, so both behave the same."""
    if "\x00" in value:
        raise BadRequest(f"{name} must not contain the NUL character (U+0000)")
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (BadRequest otherwise)."""
    if not body:
        raise BadRequest("a JSON body is required")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object")
    return data
