"""What the storage modules share: the storage error and the transaction helper."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import LollmsError


class StorageError(LollmsError):
    """The database file is unusable (not SQLite, or written by a newer server)."""


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One transaction on an autocommit connection: committed if the block ends normally,
    rolled back if it raises (whatever it raises)."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
