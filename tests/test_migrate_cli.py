"""`lollms-fast migrate`: a 2023 SQLite file into PostgreSQL through the real command (a child
process), everything equal and the source untouched; refusals; PostgreSQL back to SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from test_storage_migration import make_2023_database

from lollms_fast.storage.base import NewMessage, Store
from lollms_fast.storage.copy import ORPHAN_TITLE, MigrateRefused, migrate_copy
from lollms_fast.storage.discussions import SQLiteStore
from lollms_fast.storage.postgres import PostgresStore

PASSWORD = "s3cret-pw"  # servicekit.PostgresServer.password


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "lollms_fast", "migrate", *args],
                          capture_output=True, text=True, timeout=120)
    assert PASSWORD not in done.stdout + done.stderr
    return done


def fingerprint(path: Path) -> dict[str, str]:
    """The bytes of a SQLite file and of whatever sits beside it (journal, WAL)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


def source_rows(path: Path) -> tuple[list[Any], list[Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (conn.execute("SELECT id, title, created_at FROM discussion ORDER BY id").fetchall(),
                conn.execute("SELECT id, sender, content, type, rank, parent, created_at, "
                             "discussion_id FROM message ORDER BY id").fetchall())
    finally:
        conn.close()


async def rows_of(store: Store) -> tuple[list[Any], list[Any]]:
    heads: list[Any] = []
    rows: list[Any] = []
    async for h, r in store.dump():
        heads += h
        rows += r
    return heads, sorted(rows)


async def test_2023_sqlite_to_postgres_and_back(tmp_path: Path, pg_url: str) -> None:
    source = tmp_path / "old" / "database.db"
    make_2023_database(source)
    before = fingerprint(source)
    expected = source_rows(source)

    done = migrate("--from", f"sqlite:///{source}", "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert "copied 2 discussions and 6 messages" in done.stdout
    assert "verified" in done.stdout and "(schema version 3)" in done.stdout
    assert fingerprint(source) == before  # not a byte changed, no journal left behind

    store = PostgresStore(pg_url)
    await store.start()
    try:
        assert await rows_of(store) == expected  # ids, parents and dates exactly
        d, (m,) = await store.create("new", [NewMessage("u", "after")])
        assert (d, m) == (3, 8)  # the counters continue past the largest copied id
    finally:
        await store.close()

    again = migrate("--from", f"sqlite:///{source}", "--to", pg_url)
    assert again.returncode == 1 and "not empty" in again.stderr
    assert again.stdout == ""

    back = tmp_path / "back.db"
    done = migrate("--from", pg_url, "--to", f"sqlite:///{back}")
    assert done.returncode == 0, done.stderr
    assert "copied 3 discussions and 7 messages" in done.stdout
    copy = SQLiteStore(back)
    await copy.start()
    try:
        heads, rows = await rows_of(copy)
        assert (heads[:2], rows[:6]) == expected
        assert heads[2][:2] == (3, "new") and rows[6][:3] == (8, "u", "after")
        assert (await copy.create("next"))[0] == 4
    finally:
        await copy.close()


def test_unreachable_or_bad_password_is_exit_2_without_the_password(
        tmp_path: Path, postgres_server: Any) -> None:
    source = tmp_path / "d.db"
    make_2023_database(source)
    wrong = postgres_server.url_for("postgres", password="hunter2-nope")
    done = migrate("--from", f"sqlite:///{source}", "--to", wrong)
    assert done.returncode == 2 and "password authentication failed" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    missing = migrate("--from", f"sqlite:///{tmp_path / 'nope.db'}", "--to", wrong)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "nope.db").exists()


def add_orphan_and_nul(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO message (id, discussion_id, sender, content, type, rank, parent) "
                 "VALUES (40, 9, 'user', 'left behind', 0, 0, 0)")
    conn.execute("UPDATE message SET content = ? WHERE id = 2", ("nul\x00here",))
    conn.commit()
    conn.close()


async def test_orphans_and_nul_are_refused_then_carried_on_request(tmp_path: Path,
                                                                  pg_url: str) -> None:
    source = tmp_path / "d.db"
    make_2023_database(source)
    add_orphan_and_nul(source)
    before = fingerprint(source)
    with pytest.raises(MigrateRefused, match=r"message ids \[40\].*discussions \[9\]"):
        await migrate_copy(f"sqlite:///{source}", pg_url, root=tmp_path)
    with pytest.raises(MigrateRefused, match=r"NUL.*messages \[2\]"):
        await migrate_copy(f"sqlite:///{source}", pg_url, root=tmp_path, adopt_orphans=True)
    conn = await asyncpg.connect(pg_url)
    try:  # refusals write nothing
        assert await conn.fetchval("SELECT count(*) FROM message") == 0
    finally:
        await conn.close()
    report = await migrate_copy(f"sqlite:///{source}", pg_url, root=tmp_path,
                                adopt_orphans=True, replace_nul=True)
    assert (report.adopted, report.orphans, report.nul_messages) == ([9], [40], [2])
    assert (report.discussions, report.messages) == (3, 7)
    assert fingerprint(source) == before
    store = PostgresStore(pg_url)
    await store.start()
    try:
        messages = await store.messages(9)
        assert messages is not None and [m["id"] for m in messages] == [40]
        listed = {d["id"]: d["title"] for d in orjson.loads(await store.list_json())}
        assert listed[9] == ORPHAN_TITLE.format(id=9)
        first = await store.messages(1)
        assert first is not None and first[1]["content"] == "nul\ufffdhere"
    finally:
        await store.close()


async def test_sqlite_to_sqlite_keeps_nul_and_refuses_itself(tmp_path: Path) -> None:
    source = tmp_path / "d.db"
    make_2023_database(source)
    add_orphan_and_nul(source)
    with pytest.raises(MigrateRefused, match="same database"):
        await migrate_copy(f"sqlite:///{source}", f"sqlite:///{source}", root=tmp_path)
    report = await migrate_copy(f"sqlite:///{source}", f"sqlite:///{tmp_path / 'c.db'}",
                                root=tmp_path, adopt_orphans=True)
    assert not report.nul_replaced  # SQLite holds NUL: copied as it is
    copy = SQLiteStore(tmp_path / "c.db")
    await copy.start()
    try:
        first = await copy.messages(1)
        assert first is not None and first[1]["content"] == "nul\x00here"
    finally:
        await copy.close()
