"""Discussion and message routes (SPEC 2) on a real server, each test run twice: on a real
SQLite file and on a real PostgreSQL database (tests/servicekit.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from lollms_fast.config import Config
from lollms_fast.server.keys import DISCUSSIONS
from lollms_fast.storage.discussions import SQLiteStore


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The store under test: "" is the SQLite file of the data dir."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def rest_client(aiohttp_client: Any, make_config: Callable[..., Config],
                      db_url: str) -> Any:
    """conftest's rest_client, on either store."""
    from conftest import REST_BODY_LIMIT

    from lollms_fast.app import build_app

    config = make_config(max_body_size=REST_BODY_LIMIT, db_url=db_url)
    return await aiohttp_client(build_app(config, backend_factory=None))


async def count_messages(client: TestClient, discussion_id: int) -> int:
    """Rows in the message table for this discussion, read behind the store's back."""
    store = client.server.app[DISCUSSIONS].store
    if isinstance(store, SQLiteStore):
        return int(await store.db.read(lambda c: c.execute(
            "SELECT count(*) FROM message WHERE discussion_id = ?",
            (discussion_id,)).fetchone()[0]))
    conn = await asyncpg.connect(store.url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM message WHERE discussion_id = $1",
                                       discussion_id))
    finally:
        await conn.close()


async def ok_json(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    return await resp.json()


async def new_discussion(client: TestClient, title: str | None = None) -> dict[str, Any]:
    params = {} if title is None else {"title": title}
    return await ok_json(await client.get("/new_discussion", params=params))


async def load(client: TestClient, discussion_id: Any) -> list[dict[str, Any]]:
    return await ok_json(await client.post("/load_discussion", json={"id": discussion_id}))


async def add_message(client: TestClient, discussion_id: int, sender: str, content: str,
                      parent: int | None) -> int:
    from lollms_fast.storage.base import NewMessage

    store = client.server.app[DISCUSSIONS].store
    return await store.add_message(discussion_id, NewMessage(sender, content, parent=parent))


async def snapshot(client: TestClient) -> bytes:
    resp = await client.get("/export")
    assert resp.status == 200
    return await resp.read()


# ------------------------------------------------------------------ happy paths


async def test_new_discussion_inserts_conditioning_and_welcome(rest_client: TestClient) -> None:
    created = await new_discussion(rest_client, "first")
    assert set(created) == {"id", "time", "welcome_message", "sender"}
    assert created["sender"] == "lollms" and created["welcome_message"].startswith("Welcome")
    assert "{{" not in created["welcome_message"]
    messages = await load(rest_client, created["id"])
    assert [m["type"] for m in messages] == [1, 0]
    conditioning, welcome = messages
    assert conditioning["sender"] == "conditionner" and "{{date}}" not in conditioning["content"]
    assert welcome["parent"] == conditioning["id"] and welcome["sender"] == "lollms"
    assert set(welcome) == {"id", "content", "parent", "rank", "sender", "type"}
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert listed == [{"id": created["id"], "title": "first"}]


async def test_new_discussion_without_title_is_null(rest_client: TestClient) -> None:
    created = await new_discussion(rest_client)
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert listed == [{"id": created["id"], "title": None}]


async def test_list_discussions_oldest_first(rest_client: TestClient) -> None:
    ids = [(await new_discussion(rest_client, f"d{i}"))["id"] for i in range(5)]
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert [d["id"] for d in listed] == sorted(ids)


async def test_rename_and_edit_title(rest_client: TestClient) -> None:
    a = (await new_discussion(rest_client, "a"))["id"]
    b = (await new_discussion(rest_client, "b"))["id"]
    assert (await ok_json(await rest_client.post("/rename", json={"title": "B!"})))["status"]
    assert (await ok_json(await rest_client.post(
        "/edit_title", json={"id": a, "title": "ünïcode ✓"})))["status"]
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert listed == [{"id": a, "title": "ünïcode ✓"}, {"id": b, "title": "B!"}]


async def test_rename_without_current_discussion_is_409(rest_client: TestClient) -> None:
    body = await ok_json(await rest_client.post("/rename", json={"title": "x"}), 409)
    assert body["status"] is False and body["error"]


async def test_delete_discussion_deletes_messages(rest_client: TestClient) -> None:
    d = (await new_discussion(rest_client))["id"]
    keep = (await new_discussion(rest_client))["id"]
    assert await ok_json(await rest_client.post("/delete_discussion", json={"id": d})) == {
        "status": True}
    assert [x["id"] for x in await ok_json(await rest_client.get("/list_discussions"))] == [keep]
    await ok_json(await rest_client.post("/load_discussion", json={"id": d}), 404)
    assert await count_messages(rest_client, d) == 0
    # deleting the current discussion: rename has nothing to act on any more
    await rest_client.post("/load_discussion", json={"id": keep})
    await rest_client.post("/delete_discussion", json={"id": keep})
    await ok_json(await rest_client.post("/rename", json={"title": "x"}), 409)


async def test_message_edit_rank_delete(rest_client: TestClient) -> None:
    d = (await new_discussion(rest_client))["id"]
    messages = await load(rest_client, d)
    welcome = messages[-1]["id"]
    user = await add_message(rest_client, d, "user", "hello", welcome)
    answer = await add_message(rest_client, d, "lollms", "hi", user)

    resp = await rest_client.get("/update_message", params={"id": user, "message": "héllo 🌍"})
    assert await ok_json(resp) == {"status": True}
    for _ in range(2):
        up = await ok_json(await rest_client.get("/message_rank_up", params={"id": answer}))
    assert up == {"status": True, "new_rank": 2}
    down = await ok_json(await rest_client.get("/message_rank_down", params={"id": answer}))
    assert down == {"status": True, "new_rank": 1}
    assert await ok_json(await rest_client.get("/delete_message", params={"id": user})) == {
        "status": True}
    after = {m["id"]: m for m in await load(rest_client, d)}
    assert user not in after
    assert after[answer]["rank"] == 1 and after[answer]["parent"] == user  # replies stay


@pytest.mark.parametrize("route", ["/update_message", "/message_rank_up", "/message_rank_down",
                                   "/delete_message"])
async def test_message_routes_unknown_id_is_404(rest_client: TestClient, route: str) -> None:
    await new_discussion(rest_client)
    before = await snapshot(rest_client)
    body = await ok_json(await rest_client.get(route, params={"id": 999999, "message": "x"}),
                         404)
    assert body["status"] is False and "999999" in body["error"]
    assert await snapshot(rest_client) == before


async def test_update_message_needs_message(rest_client: TestClient) -> None:
    await ok_json(await rest_client.get("/update_message", params={"id": 1}), 400)


@pytest.mark.parametrize("route", ["/update_message", "/message_rank_up", "/message_rank_down",
                                   "/delete_message"])
async def test_message_routes_need_an_id(rest_client: TestClient, route: str) -> None:
    err = await ok_json(await rest_client.get(route, params={"message": "x"}), 400)
    assert err["status"] is False and "id" in err["error"]


async def test_discussion_routes_unknown_id_is_404(rest_client: TestClient) -> None:
    await new_discussion(rest_client, "kept")
    before = await snapshot(rest_client)
    for route, body in (("/load_discussion", {"id": 4040}), ("/delete_discussion", {"id": 4040}),
                        ("/edit_title", {"id": 4040, "title": "x"}),
                        ("/load_discussion", {"id": "-1"})):
        err = await ok_json(await rest_client.post(route, json=body), 404)
        assert err["status"] is False
    assert await snapshot(rest_client) == before


# ------------------------------------------------------------------ sessions


async def test_current_discussion_is_per_client(rest_client: TestClient,
                                                other_client: TestClient) -> None:
    mine = (await new_discussion(rest_client, "mine"))["id"]
    theirs = (await new_discussion(other_client, "theirs"))["id"]
    assert mine != theirs
    assert rest_client.session.cookie_jar.filter_cookies(rest_client.make_url("/")) != \
        other_client.session.cookie_jar.filter_cookies(other_client.make_url("/"))
    await ok_json(await rest_client.post("/rename", json={"title": "renamed by me"}))
    await ok_json(await other_client.post("/rename", json={"title": "renamed by them"}))
    titles = {d["id"]: d["title"]
              for d in await ok_json(await rest_client.get("/list_discussions"))}
    assert titles == {mine: "renamed by me", theirs: "renamed by them"}
    text_mine = await ok_json(await rest_client.get("/export_discussion"))
    text_theirs = await ok_json(await other_client.get("/export_discussion"))
    assert text_mine == text_theirs  # same personality, same messages: only ids differ
    # a client without a cookie has no current discussion at all
    fresh = await ok_json(await rest_client.post("/rename", json={"title": "x"},
                                                 cookies={"lollms_session": "forged"}), 409)
    assert fresh["status"] is False


async def test_session_cookie_is_httponly(rest_client: TestClient) -> None:
    resp = await rest_client.get("/new_discussion")
    cookie = resp.cookies["lollms_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    second = await rest_client.get("/list_discussions")
    assert "lollms_session" not in second.cookies  # not re-issued once known


async def test_stop_gen_and_generation_status(rest_client: TestClient) -> None:
    assert await ok_json(await rest_client.get("/get_generation_status")) == {"status": False}
    assert await ok_json(await rest_client.get("/stop_gen")) == {"status": True}


# ------------------------------------------------------------------ export / import


async def test_export_all_and_multiple(rest_client: TestClient) -> None:
    a = (await new_discussion(rest_client, "a"))["id"]
    b = (await new_discussion(rest_client, "b"))["id"]
    resp = await rest_client.get("/export")
    exported = await ok_json(resp)
    assert [d["id"] for d in exported] == [a, b]
    message = exported[0]["messages"][0]
    assert set(message) == {"id", "sender", "content", "type", "rank", "parent", "created_at"}
    some = await ok_json(await rest_client.post("/export_multiple_discussions",
                                                json={"discussion_ids": [b]}))
    assert [d["id"] for d in some] == [b]
    none = await ok_json(await rest_client.post("/export_multiple_discussions",
                                                json={"discussion_ids": []}))
    assert none == []
    await ok_json(await rest_client.post("/export_multiple_discussions",
                                         json={"discussion_ids": [a, 424242]}), 404)


async def test_export_of_empty_database(rest_client: TestClient) -> None:
    assert await ok_json(await rest_client.get("/export")) == []


async def test_export_streams_many_discussions(rest_client: TestClient) -> None:
    from lollms_fast.storage.base import EXPORT_BATCH, ImportedDiscussion, NewMessage

    store = rest_client.server.app[DISCUSSIONS].store
    count = EXPORT_BATCH * 2 + 7
    ids = await store.import_many([ImportedDiscussion(f"t{i}", []) for i in range(count)])
    await store.add_message(ids[0], NewMessage("user", "x"))
    resp = await rest_client.get("/export")
    assert resp.headers.get("Transfer-Encoding") == "chunked"  # streamed, not one body
    exported = await ok_json(resp)
    assert len(exported) == count and exported[0]["messages"][0]["content"] == "x"


async def test_import_remaps_parents(rest_client: TestClient) -> None:
    payload = [{"id": 70, "title": "imported", "messages": [
        {"id": 500, "sender": "user", "content": "q", "type": 0, "rank": 0, "parent": -1},
        {"id": 501, "sender": "lollms", "content": "a", "type": 0, "rank": 3, "parent": 500},
        {"id": 502, "sender": "lollms", "content": "a2", "type": 0, "rank": 0, "parent": 500},
    ]}]
    body = await ok_json(await rest_client.post("/import_multiple_discussions",
                                                json={"jArray": payload}))
    assert body["status"] is True and len(body["ids"]) == 1
    messages = await load(rest_client, body["ids"][0])
    q, a, a2 = messages
    assert q["parent"] == -1 and a["parent"] == q["id"] and a2["parent"] == q["id"]
    assert a["rank"] == 3 and q["id"] != 500
    # what /export wrote imports back (round trip), ids fresh again
    exported = await ok_json(await rest_client.get("/export"))
    again = await ok_json(await rest_client.post("/import_multiple_discussions",
                                                 json={"jArray": exported}))
    second = await load(rest_client, again["ids"][0])
    assert [m["content"] for m in second] == ["q", "a", "a2"]
    assert second[1]["parent"] == second[0]["id"]


async def test_import_2023_export_without_message_ids(rest_client: TestClient) -> None:
    payload = [{"id": 1, "title": None, "messages": [
        {"sender": "user", "content": "q", "type": 0, "rank": 0, "parent": 0},
        {"sender": "gpt4all", "content": "a", "type": 0, "rank": 0, "parent": 12},
    ]}]
    body = await ok_json(await rest_client.post("/import_multiple_discussions",
                                                json={"jArray": payload}))
    q, a = await load(rest_client, body["ids"][0])
    assert a["parent"] == q["id"]  # follows the order, never a stale 2023 id


@pytest.mark.parametrize("jarray", [
    "nope", [1], [{"title": 5}], [{"messages": "x"}], [{"messages": [{"sender": "u"}]}],
    [{"messages": [{"sender": "u", "content": "c", "parent": "1"}]}],
    [{"messages": [{"sender": "u", "content": "c", "rank": True}]}],
    [{"title": "ok", "messages": []}, {"messages": [5]}],  # one bad item: nothing imported
    # a created_at that is not a date would be stored as a number (NUMERIC affinity)
    [{"messages": [{"sender": "u", "content": "c", "created_at": "1e100"}]}],
    [{"messages": [{"sender": "u", "content": "c", "created_at": "12"}]}],
])
async def test_import_rejects_bad_payload(rest_client: TestClient, jarray: Any) -> None:
    before = await snapshot(rest_client)
    body = await ok_json(await rest_client.post("/import_multiple_discussions",
                                                json={"jArray": jarray}), 400)
    assert body["status"] is False
    assert await snapshot(rest_client) == before


async def test_imported_dates_come_back_as_text(rest_client: TestClient) -> None:
    stamps = ["2023-05-30 10:00:01", "2024-01-02T03:04:05.678Z", "2023-06-01"]
    payload = [{"title": "t", "messages": [{"sender": "u", "content": str(i),
                                            "created_at": stamp}
                                           for i, stamp in enumerate(stamps)]}]
    body = await ok_json(await rest_client.post("/import_multiple_discussions",
                                                json={"jArray": payload}))
    exported = await ok_json(await rest_client.post("/export_multiple_discussions",
                                                    json={"discussion_ids": body["ids"]}))
    assert [m["created_at"] for m in exported[0]["messages"]] == stamps


async def test_export_discussion_text(rest_client: TestClient) -> None:
    d = (await new_discussion(rest_client))["id"]
    welcome = (await load(rest_client, d))[-1]["id"]
    user = await add_message(rest_client, d, "user", "What is 2+2?", welcome)
    await add_message(rest_client, d, "lollms", "4", user)
    await load(rest_client, d)  # moves this client's pointer to the newest message
    text = (await ok_json(await rest_client.get("/export_discussion")))["discussion_text"]
    assert "### user:\nWhat is 2+2?" in text and "### lollms:\n4" in text
    by_id = await ok_json(await rest_client.get("/export_discussion", params={"id": d}))
    assert by_id["discussion_text"] == text
    await ok_json(await rest_client.get("/export_discussion", params={"id": 98765}), 404)


async def test_export_discussion_without_current_is_409(rest_client: TestClient) -> None:
    await ok_json(await rest_client.get("/export_discussion"), 409)


# ------------------------------------------------------------------ hostile ids


INJECTIONS = ["1 OR 1=1", "1; DROP TABLE message", "1' OR '1'='1", "0x10", "1e3", "abc", "",
              " 1", "99999999999999999999999"]


@pytest.mark.parametrize("bad", INJECTIONS)
async def test_sql_injection_in_ids_is_harmless(rest_client: TestClient, bad: str) -> None:
    d = (await new_discussion(rest_client, "target"))["id"]
    before = await snapshot(rest_client)
    for route in ("/load_discussion", "/delete_discussion"):
        await ok_json(await rest_client.post(route, json={"id": bad}), 400)
    await ok_json(await rest_client.post("/edit_title", json={"id": bad, "title": "x"}), 400)
    for route in ("/update_message", "/message_rank_up", "/message_rank_down",
                  "/delete_message"):
        await ok_json(await rest_client.get(route, params={"id": bad, "message": "x"}), 400)
    await ok_json(await rest_client.get("/export_discussion", params={"id": bad}), 400) \
        if bad else None
    await ok_json(await rest_client.post("/export_multiple_discussions",
                                         json={"discussion_ids": [bad]}), 400)
    assert await snapshot(rest_client) == before
    assert [x["id"] for x in await ok_json(await rest_client.get("/list_discussions"))] == [d]


async def test_sql_text_in_titles_and_content_is_stored_verbatim(rest_client: TestClient
                                                                  ) -> None:
    evil = "x'); DROP TABLE discussion; --"
    d = (await new_discussion(rest_client, evil))["id"]
    await ok_json(await rest_client.post("/edit_title", json={"id": d, "title": evil + "2"}))
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert listed == [{"id": d, "title": evil + "2"}]


@pytest.mark.parametrize("route,body", [
    ("/load_discussion", {}), ("/load_discussion", {"id": None}),
    ("/load_discussion", {"id": 1.5}), ("/load_discussion", {"id": True}),
    ("/load_discussion", {"id": [1]}), ("/delete_discussion", {}),
    ("/rename", {}), ("/rename", {"title": 5}), ("/edit_title", {"id": 1}),
    ("/edit_title", {"title": "t"}), ("/edit_title", {"id": 1, "title": None}),
    ("/export_multiple_discussions", {}), ("/export_multiple_discussions",
                                           {"discussion_ids": "1,2"}),
    ("/import_multiple_discussions", {}),
])
async def test_missing_or_mistyped_fields_are_400(rest_client: TestClient, route: str,
                                                  body: dict[str, Any]) -> None:
    await new_discussion(rest_client)
    before = await snapshot(rest_client)
    err = await ok_json(await rest_client.post(route, json=body), 400)
    assert err["status"] is False and err["error"]
    assert await snapshot(rest_client) == before


@pytest.mark.parametrize("route", ["/load_discussion", "/delete_discussion", "/rename",
                                   "/edit_title", "/export_multiple_discussions",
                                   "/import_multiple_discussions"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b"null"])
async def test_unparsable_json_is_400(rest_client: TestClient, route: str, raw: bytes) -> None:
    await new_discussion(rest_client)
    before = await snapshot(rest_client)
    resp = await rest_client.post(route, data=raw,
                                  headers={"Content-Type": "application/json"})
    err = await ok_json(resp, 400)
    assert err["status"] is False
    assert await snapshot(rest_client) == before


@pytest.mark.parametrize("route", ["/load_discussion", "/delete_discussion", "/rename",
                                   "/edit_title", "/export_multiple_discussions"])
async def test_oversize_body_is_413(rest_client: TestClient, route: str) -> None:
    """max_body_size; imports have their own limit (tests/test_security.py)."""
    from conftest import REST_BODY_LIMIT

    await new_discussion(rest_client)
    before = await snapshot(rest_client)
    big = orjson.dumps({"id": 1, "title": "x" * REST_BODY_LIMIT,
                        "jArray": [{"title": "y" * REST_BODY_LIMIT}]})
    resp = await rest_client.post(route, data=big,
                                  headers={"Content-Type": "application/json"})
    err = await ok_json(resp, 413)
    assert err["status"] is False
    assert await snapshot(rest_client) == before


async def test_listings_round_trip_awkward_text(rest_client: TestClient) -> None:
    """list/load JSON is built by SQLite: quotes, escapes, control characters, emoji and
    non-BMP text must come back exactly."""
    awkward = 'q"uote \\ back\nnew\ttab \x01 \u2028 é 😀 𝄞 </script>'
    d = (await new_discussion(rest_client, awkward))["id"]
    await add_message(rest_client, d, awkward, awkward, None)
    listed = await ok_json(await rest_client.get("/list_discussions"))
    assert listed == [{"id": d, "title": awkward}]
    last = (await load(rest_client, d))[-1]
    assert last["content"] == awkward and last["sender"] == awkward and last["parent"] is None


async def test_nul_in_user_text_is_400_on_every_store(rest_client: TestClient) -> None:
    """PostgreSQL text cannot hold U+0000: what users send with one is refused, whatever the
    store, and nothing changes."""
    d = (await new_discussion(rest_client, "kept"))["id"]
    welcome = (await load(rest_client, d))[-1]["id"]
    before = await snapshot(rest_client)
    err = await ok_json(await rest_client.get("/new_discussion", params={"title": "a\x00b"}),
                        400)
    assert "NUL" in err["error"]
    await ok_json(await rest_client.post("/rename", json={"title": "\x00"}), 400)
    await ok_json(await rest_client.post("/edit_title", json={"id": d, "title": "x\x00"}), 400)
    await ok_json(await rest_client.get("/update_message",
                                        params={"id": welcome, "message": "a\x00"}), 400)
    for message in ({"sender": "u\x00", "content": "c"}, {"sender": "u", "content": "\x00"}):
        await ok_json(await rest_client.post("/import_multiple_discussions", json={
            "jArray": [{"title": "t", "messages": [message]}]}), 400)
    await ok_json(await rest_client.post("/import_multiple_discussions", json={
        "jArray": [{"title": "t\x00", "messages": []}]}), 400)
    assert await snapshot(rest_client) == before
