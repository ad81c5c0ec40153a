"""Versioned, forward-only schema migrations.

The version lives where the 2023 server kept it: the one row of `schema_version`. Version 3
is the 2023 layout (`discussion`, `message`, `schema_version`); a database written by that
server, or an older one it migrated, opens here and moves forward in place.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from .base import StorageError, transaction

log = logging.getLogger("lollms_fast.storage")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (table,)).fetchone()
    return row is not None


def _to_v3(conn: sqlite3.Connection) -> None:
    """The 2023 layout; adds the columns that databases older than version 3 lack."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                 "id INTEGER PRIMARY KEY AUTOINCREMENT, version INTEGER NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS discussion ("
                 "id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT, "
                 "created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
    conn.execute("CREATE TABLE IF NOT EXISTS message ("
                 "id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL, "
                 "content TEXT NOT NULL, type INT NOT NULL, rank INT NOT NULL, parent INT, "
                 "created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
                 "discussion_id INTEGER NOT NULL, "
                 "FOREIGN KEY(discussion_id) REFERENCES discussion(id), "
                 "FOREIGN KEY(parent) REFERENCES message(id))")
    # ALTER TABLE cannot add a column with a non-constant default: old rows keep NULL dates
    if "created_at" not in _columns(conn, "discussion"):
        conn.execute("ALTER TABLE discussion ADD COLUMN created_at TIMESTAMP")
    have = _columns(conn, "message")
    for name, ddl in (("type", "type INT NOT NULL DEFAULT 0"),
                      ("rank", "rank INT NOT NULL DEFAULT 0"),
                      ("parent", "parent INT DEFAULT 0"),
                      ("created_at", "created_at TIMESTAMP")):
        if name not in have:
            conn.execute(f"ALTER TABLE message ADD COLUMN {ddl}")


_MESSAGE_COLUMNS = "id, sender, content, type, rank, parent, created_at, discussion_id"


def _to_v4(conn: sqlite3.Connection) -> None:
    """Deleting a discussion deletes its messages (ON DELETE CASCADE), and an index serves
    "messages of a discussion". `parent` loses its foreign key: 2023 rows use 0 and -1 as
    "no parent", and deleting a message keeps its replies (as in 2023)."""
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'message'").fetchone()
    conn.execute("CREATE TABLE message_v4 ("
                 "id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL, "
                 "content TEXT NOT NULL, type INT NOT NULL DEFAULT 0, "
                 "rank INT NOT NULL DEFAULT 0, parent INT, "
                 "created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
                 "discussion_id INTEGER NOT NULL "
                 "REFERENCES discussion(id) ON DELETE CASCADE)")
    conn.execute(f"INSERT INTO message_v4 ({_MESSAGE_COLUMNS}) "
                 f"SELECT {_MESSAGE_COLUMNS} FROM message ORDER BY id")
    conn.execute("DROP TABLE message")
    conn.execute("ALTER TABLE message_v4 RENAME TO message")
    if seq is not None:  # ids of deleted rows are never reused, as before
        conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'message'",
                     (seq[0],))
    conn.execute("CREATE INDEX IF NOT EXISTS message_discussion_id "
                 "ON message (discussion_id, id)")


MIGRATIONS: tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...] = (
    (3, _to_v3),
    (4, _to_v4),
)
LATEST = MIGRATIONS[-1][0]


def read_version(conn: sqlite3.Connection) -> int:
    if not _has_table(conn, "schema_version"):
        return 0
    row = conn.execute("SELECT version FROM schema_version ORDER BY id LIMIT 1").fetchone()
    return int(row[0]) if row else 0


def _write_version(conn: sqlite3.Connection, version: int) -> None:
    row = conn.execute("SELECT id FROM schema_version ORDER BY id LIMIT 1").fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_version (id, version) VALUES (1, ?)", (version,))
    else:
        conn.execute("UPDATE schema_version SET version = ? WHERE id = ?", (version, row[0]))


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to LATEST, one transaction per step; returns the final version."""
    try:
        version = read_version(conn)
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"not a usable SQLite database: {exc}") from None
    if version > LATEST:
        raise StorageError(f"the database has schema version {version}, newer than this "
                           f"server's {LATEST}; refusing to touch it")
    pending = [(v, step) for v, step in MIGRATIONS if v > version]
    if not pending:
        return version
    # table rebuilds need foreign keys off (and the pragma is a no-op inside a transaction)
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        for target, step in pending:
            with transaction(conn):  # BEGIN IMMEDIATE: one process migrates at a time
                # another process (a replica) may have done this step since the first read
                if read_version(conn) >= target:
                    version = read_version(conn)
                    continue
                step(conn)
                _write_version(conn, target)
            log.info("database schema migrated to version %d", target)
            version = target
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
    return version
