"""A database written by the 2023 server (schema version 3, its exact DDL) opens, migrates in
place with nothing lost, and serves the REST routes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.storage.db import Database
from lollms_fast.storage.migrations import LATEST, StorageError

# api/db.py at e3342538 (2023-06-01)
DDL_2023 = (
    "CREATE TABLE schema_version (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "version INTEGER NOT NULL)",
    "CREATE TABLE discussion (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT, "
    "created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
    "CREATE TABLE message (id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL, "
    "content TEXT NOT NULL, type INT NOT NULL, rank INT NOT NULL, parent INT, "
    "created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, discussion_id INTEGER NOT NULL, "
    "FOREIGN KEY(discussion_id) REFERENCES discussion(id), "
    "FOREIGN KEY(parent) REFERENCES message(id))",
)

ROWS_2023 = [
    # (discussion id, sender, content, type, rank, parent)
    (1, "conditionner", "Instruction: act as gpt4all", 1, 0, 0),
    (1, "gpt4all", "Welcome! 👋", 0, 0, 1),
    (1, "user", "Bonjour, ça va ?", 0, 0, 2),
    (1, "gpt4all", "Très bien", 0, 2, 3),
    (1, "gpt4all", "Bien, merci", 0, -1, 3),  # a regenerated sibling
    (2, "user", "orphan parent from the global-pointer bug", 0, 0, 4),
]


def make_2023_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for ddl in DDL_2023:
        conn.execute(ddl)
    conn.execute("INSERT INTO schema_version (version) VALUES (3)")
    conn.execute("INSERT INTO discussion (title, created_at) VALUES "
                 "('first', '2023-05-30 10:00:00'), (NULL, '2023-05-31 11:00:00')")
    conn.executemany("INSERT INTO message (discussion_id, sender, content, type, rank, parent, "
                     "created_at) VALUES (?, ?, ?, ?, ?, ?, '2023-05-30 10:00:01')", ROWS_2023)
    conn.execute("DELETE FROM message WHERE id = 6")  # ids must never be reused after
    conn.execute("INSERT INTO message (discussion_id, sender, content, type, rank, parent) "
                 "VALUES (2, 'user', 'later', 0, 0, 0)")
    conn.commit()
    conn.close()


@pytest.fixture
def config_2023(make_config: Callable[..., Config]) -> Config:
    config = make_config()
    make_2023_database(config.database_path)
    return config


async def test_2023_database_migrates_and_serves(aiohttp_client: Any,
                                                 config_2023: Config) -> None:
    client = await aiohttp_client(build_app(config_2023, backend_factory=None))
    listed = await (await client.get("/list_discussions")).json()
    assert listed == [{"id": 1, "title": "first"}, {"id": 2, "title": None}]
    messages = await (await client.post("/load_discussion", json={"id": 1})).json()
    assert [(m["sender"], m["content"], m["type"], m["rank"], m["parent"])
            for m in messages] == [r[1:] for r in ROWS_2023[:5]]
    exported = await (await client.get("/export")).json()
    assert exported[0]["messages"][0]["created_at"] == "2023-05-30 10:00:01"
    # deleting a discussion now takes its messages with it, and new rows get fresh ids
    created = await (await client.get("/new_discussion")).json()
    assert created["id"] == 3
    fresh = await (await client.post("/load_discussion", json={"id": 3})).json()
    assert fresh[0]["id"] > 7
    assert (await client.post("/delete_discussion", json={"id": 1})).status == 200
    await client.close()

    conn = sqlite3.connect(config_2023.database_path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == LATEST
        assert conn.execute("SELECT count(*) FROM message WHERE discussion_id = 1"
                            ).fetchone()[0] == 0
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_pre_v3_database_gains_the_columns(tmp_path: Path) -> None:
    """The oldest layout (id, sender, content, discussion_id; no schema_version)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE discussion (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT)")
    conn.execute("CREATE TABLE message (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "sender TEXT NOT NULL, content TEXT NOT NULL, discussion_id INTEGER NOT NULL)")
    conn.execute("INSERT INTO discussion (title) VALUES ('ancient')")
    conn.execute("INSERT INTO message (sender, content, discussion_id) VALUES ('user', 'hi', 1)")
    conn.commit()
    conn.close()
    db = await Database.open(path)
    try:
        rows = await db.read(lambda c: c.execute(
            "SELECT sender, content, type, rank, discussion_id FROM message").fetchall())
        assert rows == [("user", "hi", 0, 0, 1)]
        assert db.schema_version == LATEST
    finally:
        await db.close()


async def test_newer_or_foreign_file_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
    conn.execute("INSERT INTO schema_version VALUES (1, 999)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError):
        await Database.open(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError):
        await Database.open(junk)
