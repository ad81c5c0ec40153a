"""Typed errors, each carrying the HTTP status the middleware answers with."""

from __future__ import annotations


class LollmsError(Exception):
    status = 500

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # what the OpenAI error shape reports besides the message (SPEC section 9)
        self.param = param
        self.code = code


class BadRequest(LollmsError, ValueError):
    status = 400


class Unauthorized(LollmsError):
    status = 401


class NotFound(LollmsError, LookupError):
    status = 404


class Conflict(LollmsError):
    status = 409


class PayloadTooLarge(LollmsError):
    status = 413


class UnsupportedMediaType(LollmsError):
    """A body that is not declared as JSON (a form, text/plain): CSRF-safe routes take JSON
    only, which a cross-site form cannot send."""

    status = 415


class UpstreamError(LollmsError):
    """A server this one fetched from failed (a model download)."""

    status = 502


class Busy(LollmsError):
    """Every slot and the whole wait queue are taken."""

    status = 503


class ModelNotReady(LollmsError):
    status = 503


class ModelLoadError(LollmsError):
    """The model file is missing, corrupt or of an unsupported format."""

    status = 500
