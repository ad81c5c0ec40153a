"""The SQLite store: typed queries on discussions and messages, every statement parameterised.

The sync functions take a connection and run on a database thread; `SQLiteStore` is the
async face (the `Store` interface) the services use.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from .base import (
    EXPORT_BATCH,
    MSG_CONDITIONING,
    MSG_NORMAL,
    DiscussionRow,
    ImportedDiscussion,
    ImportedMessage,
    MessageRow,
    NewMessage,
    imported_parents,
)
from .db import Database

__all__ = ["EXPORT_BATCH", "MSG_CONDITIONING", "MSG_NORMAL", "ImportedDiscussion",
           "ImportedMessage", "NewMessage", "SQLiteStore"]

# SQLite's default limit on host parameters is 32766; stay well below
_IN_CHUNK = 500


# ------------------------------------------------------------------ sync queries


# The two hot reads answer with JSON built by SQLite itself (json1, in C, outside the GIL), so
# a 10,000-row list costs the event loop nothing and the reader thread no Python objects.
# A subquery with ORDER BY feeding an aggregate is never flattened: rows arrive in id order.
_LIST_JSON = ("SELECT CAST(json_group_array(json_object('id', id, 'title', title)) AS BLOB) "
              "FROM (SELECT id, title FROM discussion ORDER BY id)")
_MESSAGES_JSON = ("SELECT CAST(json_group_array(json_object('id', id, 'content', content, "
                  "'parent', parent, 'rank', rank, 'sender', sender, 'type', type)) AS BLOB), "
                  "max(id) FROM (SELECT id, content, parent, rank, sender, type FROM message "
                  "WHERE discussion_id = ? ORDER BY id)")


def list_discussions_json(conn: sqlite3.Connection) -> bytes:
    """`list_discussions` as a JSON array, ready to send."""
    return bytes(conn.execute(_LIST_JSON).fetchone()[0])


def messages_json(conn: sqlite3.Connection, discussion_id: int) -> tuple[bytes, int | None]:
    """The load_discussion JSON array (ordered by id) and the newest message id."""
    body, newest = conn.execute(_MESSAGES_JSON, (discussion_id,)).fetchone()
    return bytes(body), newest


def discussion_exists(conn: sqlite3.Connection, discussion_id: int) -> bool:
    return conn.execute("SELECT 1 FROM discussion WHERE id = ?",
                        (discussion_id,)).fetchone() is not None


def missing_discussions(conn: sqlite3.Connection, ids: Sequence[int]) -> list[int]:
    found: set[int] = set()
    unique = sorted(set(ids))
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start:start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(
            f"SELECT id FROM discussion WHERE id IN ({marks})", chunk))
    return [i for i in unique if i not in found]


def create_discussion(conn: sqlite3.Connection, title: str | None) -> int:
    cur = conn.execute("INSERT INTO discussion (title) VALUES (?)", (title,))
    assert cur.lastrowid is not None
    return cur.lastrowid


def rename_discussion(conn: sqlite3.Connection, discussion_id: int, title: str) -> bool:
    cur = conn.execute("UPDATE discussion SET title = ? WHERE id = ?", (title, discussion_id))
    return cur.rowcount > 0


def delete_discussion(conn: sqlite3.Connection, discussion_id: int) -> bool:
    # ON DELETE CASCADE removes the messages; the explicit delete also covers a database
    # opened with foreign keys off
    conn.execute("DELETE FROM message WHERE discussion_id = ?", (discussion_id,))
    cur = conn.execute("DELETE FROM discussion WHERE id = ?", (discussion_id,))
    return cur.rowcount > 0


def insert_message(conn: sqlite3.Connection, discussion_id: int, m: NewMessage) -> int:
    if m.created_at is None:
        cur = conn.execute(
            "INSERT INTO message (sender, content, type, rank, parent, discussion_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (m.sender, m.content, m.type, m.rank, m.parent, discussion_id))
    else:
        cur = conn.execute(
            "INSERT INTO message (sender, content, type, rank, parent, created_at, "
            "discussion_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (m.sender, m.content, m.type, m.rank, m.parent, m.created_at, discussion_id))
    assert cur.lastrowid is not None
    return cur.lastrowid


def messages_of(conn: sqlite3.Connection, discussion_id: int) -> list[dict[str, Any]]:
    """The load_discussion shape, ordered by id."""
    rows = conn.execute(
        "SELECT id, content, parent, rank, sender, type FROM message "
        "WHERE discussion_id = ? ORDER BY id", (discussion_id,)).fetchall()
    return [{"id": r[0], "content": r[1], "parent": r[2], "rank": r[3], "sender": r[4],
             "type": r[5]} for r in rows]


def message_discussion(conn: sqlite3.Connection, message_id: int) -> int | None:
    row = conn.execute("SELECT discussion_id FROM message WHERE id = ?",
                       (message_id,)).fetchone()
    return None if row is None else int(row[0])


def last_message_id(conn: sqlite3.Connection, discussion_id: int) -> int | None:
    row = conn.execute("SELECT max(id) FROM message WHERE discussion_id = ?",
                       (discussion_id,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def update_content(conn: sqlite3.Connection, message_id: int, content: str) -> bool:
    cur = conn.execute("UPDATE message SET content = ? WHERE id = ?", (content, message_id))
    return cur.rowcount > 0


def change_rank(conn: sqlite3.Connection, message_id: int, delta: int) -> int | None:
    row = conn.execute("UPDATE message SET rank = rank + ? WHERE id = ? RETURNING rank",
                       (delta, message_id)).fetchone()
    return None if row is None else int(row[0])


def delete_message(conn: sqlite3.Connection, message_id: int) -> bool:
    cur = conn.execute("DELETE FROM message WHERE id = ?", (message_id,))
    return cur.rowcount > 0


def import_discussions(conn: sqlite3.Connection,
                       discussions: Iterable[ImportedDiscussion]) -> list[int]:
    """Insert with fresh ids; `parent` follows the old ids to the new rows
    (`base.imported_parents`)."""
    new_ids: list[int] = []
    for d in discussions:
        discussion_id = create_discussion(conn, d.title)
        new_ids.append(discussion_id)
        rows = [insert_message(conn, discussion_id, item.message) for item in d.messages]
        conn.executemany("UPDATE message SET parent = ? WHERE id = ?",
                         list(zip(imported_parents(rows, d.messages), rows, strict=True)))
    return new_ids


def _export_batch(conn: sqlite3.Connection, after_id: int,
                  ids: Sequence[int] | None) -> tuple[list[bytes], int | None]:
    """Up to EXPORT_BATCH discussions with id > after_id (only those in the sorted `ids` when
    given), each encoded as JSON; returns (items, id to continue after, or None when done)."""
    if ids is None:
        heads = conn.execute("SELECT id, title FROM discussion WHERE id > ? ORDER BY id "
                             "LIMIT ?", (after_id, EXPORT_BATCH)).fetchall()
        if not heads:
            return [], None
        rows = conn.execute(
            "SELECT id, sender, content, type, rank, parent, created_at, discussion_id "
            "FROM message WHERE discussion_id BETWEEN ? AND ? ORDER BY discussion_id, id",
            (heads[0][0], heads[-1][0]))
        resume: int | None = heads[-1][0] if len(heads) == EXPORT_BATCH else None
    else:
        rest = [i for i in ids if i > after_id]
        wanted = rest[:EXPORT_BATCH]
        if not wanted:
            return [], None
        marks = ",".join("?" * len(wanted))
        heads = conn.execute(f"SELECT id, title FROM discussion WHERE id IN ({marks}) "
                             f"ORDER BY id", wanted).fetchall()
        rows = conn.execute(
            f"SELECT id, sender, content, type, rank, parent, created_at, discussion_id "
            f"FROM message WHERE discussion_id IN ({marks}) ORDER BY discussion_id, id",
            wanted)
        resume = wanted[-1] if len(rest) > EXPORT_BATCH else None
    by_discussion: dict[int, list[dict[str, Any]]] = {h[0]: [] for h in heads}
    for r in rows:
        bucket = by_discussion.get(r[7])
        if bucket is not None:
            bucket.append({"id": r[0], "sender": r[1], "content": r[2], "type": r[3],
                           "rank": r[4], "parent": r[5], "created_at": r[6]})
    items = [orjson.dumps({"id": i, "title": t, "messages": by_discussion[i]})
             for i, t in heads]
    return items, resume


# ------------------------------------------------------------------ async face


class SQLiteStore:
    """The embedded default: one file, one writer thread, a pool of reader threads."""

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.db = Database(path, durable=durable)

    @property
    def schema_version(self) -> int:
        return self.db.schema_version

    async def start(self) -> None:
        await self.db.start()

    async def close(self) -> None:
        await self.db.close()

    def describe(self) -> str:
        return f"SQLite {self.db.path}"

    async def list_json(self) -> bytes:
        return await self.db.read(list_discussions_json)

    async def messages_json(self, discussion_id: int) -> tuple[bytes, int | None] | None:
        """(JSON array of the messages, newest id), or None if there is no such discussion."""
        def run(c: sqlite3.Connection) -> tuple[bytes, int | None] | None:
            if not discussion_exists(c, discussion_id):
                return None
            return messages_json(c, discussion_id)
        return await self.db.read(run)

    async def missing(self, ids: Sequence[int]) -> list[int]:
        return await self.db.read(lambda c: missing_discussions(c, ids))

    async def create(self, title: str | None, messages: Sequence[NewMessage] = ()
                     ) -> tuple[int, list[int]]:
        """A new discussion and its first messages, each replying to the one before (the
        first keeps its own `parent`); returns (discussion id, message ids)."""
        def run(c: sqlite3.Connection) -> tuple[int, list[int]]:
            discussion_id = create_discussion(c, title)
            ids: list[int] = []
            for m in messages:
                if ids:
                    m = NewMessage(m.sender, m.content, m.type, m.rank, ids[-1], m.created_at)
                ids.append(insert_message(c, discussion_id, m))
            return discussion_id, ids
        return await self.db.write(run)

    async def rename(self, discussion_id: int, title: str) -> bool:
        return await self.db.write(lambda c: rename_discussion(c, discussion_id, title))

    async def delete(self, discussion_id: int) -> bool:
        return await self.db.write(lambda c: delete_discussion(c, discussion_id))

    async def messages(self, discussion_id: int) -> list[dict[str, Any]] | None:
        """The discussion's messages, or None if there is no such discussion."""
        def run(c: sqlite3.Connection) -> list[dict[str, Any]] | None:
            if not discussion_exists(c, discussion_id):
                return None
            return messages_of(c, discussion_id)
        return await self.db.read(run)

    async def last_message_id(self, discussion_id: int) -> int | None:
        return await self.db.read(lambda c: last_message_id(c, discussion_id))

    async def message_discussion(self, message_id: int) -> int | None:
        return await self.db.read(lambda c: message_discussion(c, message_id))

    async def add_message(self, discussion_id: int, m: NewMessage) -> int:
        return await self.db.write(lambda c: insert_message(c, discussion_id, m))

    async def update_content(self, message_id: int, content: str) -> bool:
        return await self.db.write(lambda c: update_content(c, message_id, content))

    async def change_rank(self, message_id: int, delta: int) -> int | None:
        return await self.db.write(lambda c: change_rank(c, message_id, delta))

    async def delete_message(self, message_id: int) -> bool:
        return await self.db.write(lambda c: delete_message(c, message_id))

    async def import_many(self, discussions: Sequence[ImportedDiscussion]) -> list[int]:
        return await self.db.write(lambda c: import_discussions(c, discussions))

    async def export(self, ids: Sequence[int] | None = None) -> AsyncGenerator[bytes, None]:
        """The export JSON array, in pieces of at most EXPORT_BATCH discussions: memory stays
        bounded however large the database is. `ids` restricts it to those discussions."""
        wanted = None if ids is None else sorted(set(ids))
        after = -(2**63)
        head = b"["  # sent with the first batch, so a failing first read sends nothing
        while True:
            items, last = await self.db.read(partial(_export_batch, after_id=after, ids=wanted))
            if items:
                yield head + b",".join(items)
                head = b","
            if last is None:
                break
            after = last
        yield (b"[" if head == b"[" else b"") + b"]"

    async def dump(self) -> AsyncGenerator[tuple[list[DiscussionRow], list[MessageRow]], None]:
        after = -(2**63)
        while True:
            batch = await self.db.read(partial(_dump_batch, after_id=after))
            if not batch[0]:
                return
            yield batch
            after = batch[0][-1][0]

    async def load(self, discussions: Sequence[DiscussionRow],
                   messages: Sequence[MessageRow]) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO discussion (id, title, created_at) VALUES (?, ?, ?)",
                          discussions)
            c.executemany("INSERT INTO message (id, sender, content, type, rank, parent, "
                          "created_at, discussion_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          messages)
        await self.db.write(run)

    async def finish_load(self) -> None:
        return None  # AUTOINCREMENT already continues past the largest id inserted

    async def is_empty(self) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            return (c.execute("SELECT 1 FROM discussion LIMIT 1").fetchone() is None
                    and c.execute("SELECT 1 FROM message LIMIT 1").fetchone() is None)
        return await self.db.read(run)


def _dump_batch(conn: sqlite3.Connection, after_id: int
                ) -> tuple[list[DiscussionRow], list[MessageRow]]:
    heads: list[DiscussionRow] = conn.execute(
        "SELECT id, title, created_at FROM discussion WHERE id > ? ORDER BY id LIMIT ?",
        (after_id, EXPORT_BATCH)).fetchall()
    if not heads:
        return [], []
    rows: list[MessageRow] = conn.execute(
        "SELECT id, sender, content, type, rank, parent, created_at, discussion_id "
        "FROM message WHERE discussion_id BETWEEN ? AND ? ORDER BY discussion_id, id",
        (heads[0][0], heads[-1][0])).fetchall()
    return heads, rows
