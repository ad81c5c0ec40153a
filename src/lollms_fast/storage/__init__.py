"""Discussions storage behind one interface (`base.Store`): SQLite, the embedded default, or
PostgreSQL for replicas. `open_store(url)` picks one from the `db_url` setting."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import StorageError, Store

__all__ = ["Store", "StorageError", "open_store", "redact_url"]


def sqlite_path(url: str, root: Path) -> Path:
    """The file of a `sqlite:///path` URL: `sqlite:///rel/x.db` is relative to `root` (the
    data dir), `sqlite:////abs/x.db` absolute."""
    parts = urlsplit(url)
    if parts.netloc or parts.query or parts.fragment:
        raise StorageError("a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path")
    raw = unquote(parts.path)
    if raw.startswith("/"):
        raw = raw[1:]
    if not raw:
        raise StorageError("the SQLite URL names no file")
    p = Path(raw).expanduser()
    return p if p.is_absolute() else root / p


def redact_url(url: str) -> str:
    """The URL without its password (for logs and get_config)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


def open_store(url: str, *, root: Path, durable: bool = False) -> Store:
    """The store a `db_url` names (not yet started: `await store.start()`)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from .discussions import SQLiteStore

        return SQLiteStore(sqlite_path(url, root), durable=durable)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise StorageError(f"unknown database URL scheme {scheme!r}: use sqlite:///path or "
                       f"postgresql://user@host/dbname")
