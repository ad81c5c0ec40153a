"""The `Store` contract, method by method, on both stores: SQLiteStore (a real file) and
PostgresStore (a real server, tests/servicekit.py). The same calls must give the same answers;
the JSON both build must parse equal. Then what only PostgreSQL has: concurrent starts, a
newer schema, credentials, NUL, and a server that restarts under a running store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from lollms_fast.config import Config
from lollms_fast.storage import migrations, open_store
from lollms_fast.storage.base import (
    EXPORT_BATCH,
    ImportedDiscussion,
    ImportedMessage,
    NewMessage,
    StorageError,
    Store,
)
from lollms_fast.storage.discussions import SQLiteStore
from lollms_fast.storage.postgres import LATEST, PostgresStore, StorageUnavailable

AWKWARD = 'q"uote \\ back\nnew\ttab \x01 \u2028 é 😀 𝄞 </script>'


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """(SQLite, PostgreSQL), both started on empty databases."""
    stores: tuple[Store, Store] = (SQLiteStore(tmp_path / "d.db"), PostgresStore(pg_url))
    for s in stores:
        await s.start()
    yield stores
    for s in stores:
        await s.close()


async def both(pair: tuple[Store, Store], call: Callable[[Store], Any]) -> Any:
    """`call(store)` on each store; asserts the answers are equal and returns it."""
    a, b = [await call(s) for s in pair]
    assert a == b
    return a


async def export_of(store: Store, ids: list[int] | None = None) -> tuple[int, Any]:
    pieces = [piece async for piece in store.export(ids)]
    return len(pieces), orjson.loads(b"".join(pieces))


def undated(exported: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dates set by the database clock (the second may differ between the two stores)."""
    return [{**d, "messages": [{**m, "created_at": None} for m in d["messages"]]}
            for d in exported]


async def test_same_answers_method_by_method(pair: tuple[Store, Store]) -> None:
    assert await both(pair, lambda s: s.list_json()) == b"[]"
    await both(pair, lambda s: s.is_empty())
    first = [NewMessage("conditionner", "be kind", 1, parent=0),
             NewMessage("lollms", AWKWARD), NewMessage("user", "hi")]
    d1, ids = await both(pair, lambda s: s.create("first", first))
    d2, _ = await both(pair, lambda s: s.create(None))
    d3, (only,) = await both(pair, lambda s: s.create(AWKWARD, [NewMessage("u", "x",
                                                                           parent=None)]))
    assert not await both(pair, lambda s: s.is_empty())
    listed = await both(pair, lambda s: _parsed(s.list_json()))
    assert listed == [{"id": d1, "title": "first"}, {"id": d2, "title": None},
                      {"id": d3, "title": AWKWARD}]
    # messages: each replies to the one before, the first keeps its parent
    messages = await both(pair, lambda s: s.messages(d1))
    assert [m["parent"] for m in messages] == [0, ids[0], ids[1]]
    assert (await both(pair, lambda s: s.messages(d3)))[0]["parent"] is None
    assert await both(pair, lambda s: s.messages(999)) is None
    body = await both(pair, lambda s: _parsed_pair(s.messages_json(d1)))
    assert body == (messages, ids[-1])
    assert await both(pair, lambda s: _parsed_pair(s.messages_json(d2))) == ([], None)
    assert await both(pair, lambda s: s.messages_json(424242)) is None
    assert await both(pair, lambda s: s.missing([d3, 77, d1, 77, -1])) == [-1, 77]
    assert await both(pair, lambda s: s.missing([])) == []
    assert await both(pair, lambda s: s.last_message_id(d1)) == ids[-1]
    assert await both(pair, lambda s: s.last_message_id(d2)) is None
    assert await both(pair, lambda s: s.message_discussion(only)) == d3
    assert await both(pair, lambda s: s.message_discussion(5555)) is None
    # writes
    added = await both(pair, lambda s: s.add_message(d2, NewMessage("user", "later", 0, 4,
                                                                    -1, "2023-01-02 03:04:05")))
    assert await both(pair, lambda s: s.rename(d2, "two"))
    assert not await both(pair, lambda s: s.rename(999, "x"))
    assert await both(pair, lambda s: s.update_content(ids[1], "edited"))
    assert not await both(pair, lambda s: s.update_content(999, "x"))
    assert await both(pair, lambda s: s.change_rank(ids[2], 1)) == 1
    assert await both(pair, lambda s: s.change_rank(ids[2], -3)) == -2
    assert await both(pair, lambda s: s.change_rank(999, 1)) is None
    assert await both(pair, lambda s: s.delete_message(ids[1]))
    assert not await both(pair, lambda s: s.delete_message(ids[1]))
    after = await both(pair, lambda s: s.messages(d1))
    assert [m["id"] for m in after] == [ids[0], ids[2]] and after[1]["parent"] == ids[1]
    exported = await both(pair, lambda s: _undated_export(s))
    assert exported[1]["messages"][0]["id"] == added
    dated = await both(pair, lambda s: export_of(s, [d2]))
    assert dated[1][0]["messages"][0]["created_at"] == "2023-01-02 03:04:05"
    # delete: the messages go with the discussion (cascade)
    assert await both(pair, lambda s: s.delete(d1))
    assert not await both(pair, lambda s: s.delete(d1))
    assert await both(pair, lambda s: s.message_discussion(ids[0])) is None
    dumped = await both(pair, lambda s: _undated_dump(s))
    assert {row[6] for row in dumped[1]} == {d2, d3}


async def _parsed(body: Any) -> Any:
    return orjson.loads(await body)


async def _parsed_pair(found: Any) -> Any:
    got = await found
    return None if got is None else (orjson.loads(got[0]), got[1])


async def _undated_export(store: Store) -> Any:
    return undated((await export_of(store))[1])


async def _undated_dump(store: Store) -> tuple[list[Any], list[Any]]:
    heads: list[Any] = []
    rows: list[Any] = []
    async for h, r in store.dump():
        heads += [(i, t) for i, t, _ in h]
        rows += [row[:6] + row[7:] for row in r]
    return heads, rows


async def test_list_and_messages_json_are_the_same_bytes(pair: tuple[Store, Store]) -> None:
    """The two hot reads send the database's JSON as it is: both stores write it compact,
    keys in the same order, text escaped the same way."""
    odd = AWKWARD + "\t\x01\x1f\x7f \u2028 / \\ é 😀"
    for title in ("plain", None, odd):
        did, _ = await both(pair, lambda s, t=title: s.create(t, [
            NewMessage("user", odd, parent=-1), NewMessage("lollms", "", rank=-3)]))
    await both(pair, lambda s: s.list_json())
    await both(pair, lambda s: s.messages_json(did))
    await both(pair, lambda s: s.messages_json(did + 1000))


async def test_import_parents_the_same_way(pair: tuple[Store, Store]) -> None:
    payload = [
        ImportedDiscussion("with ids", [
            ImportedMessage(500, NewMessage("user", "q", parent=-1)),
            ImportedMessage(501, NewMessage("lollms", "a", rank=3, parent=500)),
            ImportedMessage(502, NewMessage("lollms", "a2", parent=500,
                                            created_at="2023-05-30 10:00:01")),
            ImportedMessage(503, NewMessage("lollms", "dangling", parent=12345)),
        ]),
        ImportedDiscussion(None, [  # a 2023 export: no message ids, stale parents
            ImportedMessage(None, NewMessage("user", "q", parent=0)),
            ImportedMessage(None, NewMessage("gpt4all", "a", parent=12)),
        ]),
        ImportedDiscussion("empty", []),
    ]
    new_ids = await both(pair, lambda s: s.import_many(payload))
    assert len(new_ids) == 3
    q, a, a2, dangling = await both(pair, lambda s: s.messages(new_ids[0]))
    assert (q["parent"], a["parent"], a2["parent"], dangling["parent"]) == (
        -1, q["id"], q["id"], -1)
    assert a["rank"] == 3
    q, a = await both(pair, lambda s: s.messages(new_ids[1]))
    assert (q["parent"], a["parent"]) == (-1, q["id"])
    assert await both(pair, lambda s: s.messages(new_ids[2])) == []
    exported = await both(pair, lambda s: export_of(s, new_ids))
    assert exported[1][0]["messages"][2]["created_at"] == "2023-05-30 10:00:01"


async def test_export_pages_past_one_batch(pair: tuple[Store, Store]) -> None:
    count = EXPORT_BATCH * 2 + 3
    ids = await both(pair, lambda s: s.import_many(
        [ImportedDiscussion(f"t{i}", [ImportedMessage(i, NewMessage("u", str(i)))])
         for i in range(count)]))
    pieces, everything = await both(pair, lambda s: _undated_pages(s, None))
    assert pieces == 4 and len(everything) == count  # 3 batches, then the closing bracket
    assert [d["title"] for d in everything] == [f"t{i}" for i in range(count)]
    some = ids[::2] + [10**12]  # every other one, and one that does not exist
    pieces, chosen = await both(pair, lambda s: _undated_pages(s, some))
    assert pieces == 3 and [d["id"] for d in chosen] == ids[::2]
    assert await both(pair, lambda s: _undated_pages(s, [])) == (1, [])


async def _undated_pages(store: Store, ids: list[int] | None) -> tuple[int, Any]:
    pieces, body = await export_of(store, ids)
    return pieces, undated(body)


async def test_dump_load_keeps_ids_and_counters_continue(pair: tuple[Store, Store],
                                                        tmp_path: Path) -> None:
    sqlite_src, pg_src = pair
    for s in pair:
        await s.import_many([ImportedDiscussion("x", [ImportedMessage(1, NewMessage("u", "m")),
                                                      ImportedMessage(2, NewMessage("a", "n",
                                                                                    parent=1))])])
        d, _ = await s.create("gap")
        await s.delete(d)  # a hole in the ids
        await s.create("last", [NewMessage("u", "z", created_at="2020-01-01 00:00:00")])
    for source, target in ((sqlite_src, SQLiteStore(tmp_path / "copy.db")),
                           (pg_src, SQLiteStore(tmp_path / "copy2.db"))):
        await target.start()
        assert await target.is_empty()
        async for heads, rows in source.dump():
            await target.load(heads, rows)
        await target.finish_load()
        assert [x async for x in target.dump()] == [x async for x in source.dump()]
        d, (m,) = await target.create("next", [NewMessage("u", "after")])
        assert d == 4 and m == 4
        await target.close()


async def test_postgres_load_then_counters_continue(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.start()
    try:
        await store.load([(7, "seven", "2023-01-01 00:00:00"), (3, None, None)],
                         [(40, "u", "q", 0, 0, -1, None, 7), (41, "a", "r\x00", 0, 2, 40,
                                                               "2023-01-01 00:00:01", 3)])
        await store.finish_load()
        d, (m,) = await store.create("next", [NewMessage("u", "x")])
        assert (d, m) == (8, 42)
        rows = [row async for row in store.dump()]
        assert rows[0][0][:2] == [(3, None, None), (7, "seven", "2023-01-01 00:00:00")]
        assert rows[0][1][0] == (41, "a", "r\ufffd", 0, 2, 40, "2023-01-01 00:00:01", 3)
    finally:
        await store.close()


# ------------------------------------------------------------------ PostgreSQL only


async def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.start() for s in stores))
    try:
        assert [s.schema_version for s in stores] == [LATEST] * 4
        d, _ = await stores[0].create("shared")
        assert orjson.loads(await stores[3].list_json()) == [{"id": d, "title": "shared"}]
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetch("SELECT id, version FROM schema_version") == [(1, LATEST)]
    finally:
        await conn.close()


def test_both_stores_agree_on_the_schema_version() -> None:
    assert LATEST == migrations.LATEST


async def test_newer_schema_is_refused_untouched(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.start()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE schema_version SET version = 99")
        with pytest.raises(StorageError, match="99"):
            await PostgresStore(pg_url).start()
        assert await conn.fetchval("SELECT version FROM schema_version") == 99
    finally:
        await conn.close()


async def test_foreign_tables_are_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE discussion (x int)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="empty database"):
        await PostgresStore(pg_url).start()


async def test_bad_credentials_and_unreachable_never_show_the_password(
        postgres_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = postgres_server.url_for("postgres", password="hunter2-wrong")
    with pytest.raises(StorageError) as bad:
        await open_store(wrong, root=Path(".")).start()
    assert "hunter2" not in bad.value.message and "***" in bad.value.message
    assert "password authentication failed" in bad.value.message
    nowhere = "postgresql://lollms:hunter2-down@127.0.0.1:1/db"
    with pytest.raises(StorageError) as down:
        await open_store(nowhere, root=Path(".")).start()
    assert "hunter2" not in down.value.message and "127.0.0.1:1" in down.value.message
    assert "hunter2" not in caplog.text
    assert PostgresStore(nowhere).describe() == "PostgreSQL 127.0.0.1:1/db"


async def test_nul_is_replaced_not_fatal(pg_url: str) -> None:
    """Generated text may carry a NUL token: PostgreSQL stores U+FFFD in its place."""
    store = PostgresStore(pg_url)
    await store.start()
    try:
        d, (m,) = await store.create("t\x00", [NewMessage("s\x00", "a\x00b")])
        await store.update_content(m, "streamed \x00 token")
        await store.rename(d, "r\x00")
        m2 = await store.add_message(d, NewMessage("ai", "\x00"))
        (i,) = await store.import_many([ImportedDiscussion("\x00", [
            ImportedMessage(1, NewMessage("u\x00", "c\x00"))])])
        messages = await store.messages(d)
        assert messages is not None
        assert [(x["sender"], x["content"]) for x in messages] == [
            ("s\ufffd", "streamed \ufffd token"), ("ai", "\ufffd")]
        assert messages[1]["id"] == m2
        assert orjson.loads(await store.list_json()) == [{"id": d, "title": "r\ufffd"},
                                                         {"id": i, "title": "\ufffd"}]
    finally:
        await store.close()


async def test_restarted_server_is_a_503_then_works_again(
        aiohttp_client: Any, make_config: Callable[..., Config], postgres_server: Any,
        pg_url: str) -> None:
    from lollms_fast.app import build_app

    client = await aiohttp_client(build_app(make_config(db_url=pg_url), backend_factory=None))
    created = await (await client.get("/new_discussion", params={"title": "before"})).json()
    postgres_server.pause()
    try:
        resp = await client.get("/list_discussions")
        assert resp.status == 503
        body = await resp.json()
        assert body["status"] is False and "database" in body["error"]
        assert "Traceback" not in body["error"]
    finally:
        postgres_server.resume()
    resp = await client.get("/list_discussions")
    assert resp.status == 200
    assert await resp.json() == [{"id": created["id"], "title": "before"}]
    again = await client.get("/new_discussion", params={"title": "after"})  # the writer too
    assert again.status == 200


async def test_store_level_lost_connection(postgres_server: Any, pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.start()
    try:
        await store.create("x")
        postgres_server.pause()
        try:
            with pytest.raises(StorageUnavailable) as lost:
                await store.create("y")
            assert lost.value.status == 503
        finally:
            postgres_server.resume()
        assert (await store.create("z"))[0] > 1
        assert [d["title"] for d in orjson.loads(await store.list_json())] == ["x", "z"]
    finally:
        await store.close()
