"""What every store shares: the row types, the storage error, and the `Store` interface that
`SQLiteStore` (the embedded default) and `PostgresStore` (replicas) both satisfy.

The services see only `Store`; which one runs is chosen by the `db_url` setting
(`storage.open_store`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import LollmsError

MSG_NORMAL = 0
MSG_CONDITIONING = 1

# how many discussions one export read fetches (bounds the memory of a streamed export)
EXPORT_BATCH = 200


class StorageError(LollmsError):
    """The database is unusable (not ours, unreachable, or written by a newer server)."""


@dataclass(frozen=True)
class NewMessage:
    sender: str
    content: str
    type: int = MSG_NORMAL
    rank: int = 0
    parent: int | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class ImportedDiscussion:
    title: str | None
    messages: Sequence[ImportedMessage]


@dataclass(frozen=True)
class ImportedMessage:
    old_id: int | None
    message: NewMessage


def imported_parents(new_ids: Sequence[int], messages: Sequence[ImportedMessage]
                     ) -> list[int]:
    """The `parent` of each imported message, given the ids its rows got (in order): the
    new id of its old parent; a message without an old id replies to the message before it
    (the 2023 export had no ids); a parent not among the imported messages is -1 (a root,
    like 2023's welcome message)."""
    id_map = {item.old_id: new for new, item in zip(new_ids, messages, strict=True)
              if item.old_id is not None}
    parents: list[int] = []
    previous: int | None = None
    for new, item in zip(new_ids, messages, strict=True):
        old_parent = item.message.parent
        if item.old_id is None:
            parents.append(previous if previous is not None else -1)
        elif old_parent is not None and old_parent in id_map:
            parents.append(id_map[old_parent])
        else:
            parents.append(-1)
        previous = new
    return parents


# A raw row as `lollms-fast migrate` copies it: every column, ids included.
DiscussionRow = tuple[int, str | None, str | None]  # id, title, created_at
MessageRow = tuple[int, str, str, int, int, int | None, str | None, int]
# id, sender, content, type, rank, parent, created_at, discussion_id


class Store(Protocol):
    """Discussions and messages. Every write is one transaction; reads see one snapshot."""

    @property
    def schema_version(self) -> int:
        """The schema version the database is at (after `start`)."""

    async def start(self) -> None:
        """Connect, and migrate the schema to the latest version (once, whoever else is
        starting at the same moment)."""

    async def close(self) -> None: ...

    def describe(self) -> str:
        """Where the data lives, for logs (never a password)."""

    async def list_json(self) -> bytes:
        """`list_discussions` as a JSON array of {id, title}, oldest first."""

    async def messages_json(self, discussion_id: int) -> tuple[bytes, int | None] | None:
        """(JSON array of the messages, newest id), or None if there is no such discussion."""

    async def missing(self, ids: Sequence[int]) -> list[int]:
        """The ids among `ids` that name no discussion (sorted, unique)."""

    async def create(self, title: str | None, messages: Sequence[NewMessage] = ()
                     ) -> tuple[int, list[int]]:
        """A new discussion and its first messages, each replying to the one before (the
        first keeps its own `parent`); returns (discussion id, message ids)."""

    async def rename(self, discussion_id: int, title: str) -> bool: ...

    async def delete(self, discussion_id: int) -> bool:
        """Deletes the discussion and its messages."""

    async def messages(self, discussion_id: int) -> list[dict[str, Any]] | None:
        """The discussion's messages ({id, content, parent, rank, sender, type}, by id), or
        None if there is no such discussion."""

    async def last_message_id(self, discussion_id: int) -> int | None: ...

    async def message_discussion(self, message_id: int) -> int | None: ...

    async def add_message(self, discussion_id: int, m: NewMessage) -> int: ...

    async def update_content(self, message_id: int, content: str) -> bool: ...

    async def change_rank(self, message_id: int, delta: int) -> int | None:
        """The new rank, or None if there is no such message."""

    async def delete_message(self, message_id: int) -> bool: ...

    async def import_many(self, discussions: Sequence[ImportedDiscussion]) -> list[int]:
        """Insert with fresh ids, in one transaction; `parent` follows the old ids to the new
        rows. A message without an old id replies to the message before it; a parent not
        among the imported messages becomes -1."""

    def export(self, ids: Sequence[int] | None = None) -> AsyncGenerator[bytes, None]:
        """The export JSON array, in pieces of at most EXPORT_BATCH discussions."""

    # --- raw copies (`lollms-fast migrate`) ---

    def dump(self) -> AsyncGenerator[tuple[list[DiscussionRow], list[MessageRow]], None]:
        """Every row, ids and dates as stored, in batches (discussions by id, then their
        messages by id)."""

    async def load(self, discussions: Sequence[DiscussionRow],
                   messages: Sequence[MessageRow]) -> None:
        """Insert rows keeping their ids (one transaction per call)."""

    async def finish_load(self) -> None:
        """After the last `load`: id counters continue past the largest copied id."""

    async def is_empty(self) -> bool: ...


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One transaction on an autocommit SQLite connection: committed if the block ends
    normally, rolled back if it raises (whatever it raises)."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
