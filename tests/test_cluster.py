"""Replicas sharing a real Redis (`socketio_redis_url`), in one test process: two servers,
one SQLite file, one Redis. Sessions minted by one replica are valid on the other and carry
their current discussion across; stop_gen through one replica stops a generation running on
the other; settings changes and saves reach every replica; a deleted discussion is nobody's
current one; a replica without Redis refuses to start. (The three-replica layout behind
nginx with PostgreSQL is tests/test_replicas_e2e.py.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from chatkit import Browser
from fakes import scripted_loader
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.server.keys import SESSIONS, SETTINGS
from lollms_fast.services.cluster import ClusterError
from lollms_fast.services.sessions import COOKIE_NAME
from servicekit import RedisServer

Factory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh Redis per test (not conftest's session one): no test sees another's secret,
    sessions or control messages."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def replica_config(make_config: Callable[..., Config], tmp_path: Path, redis_url: str
                   ) -> Callable[..., Config]:
    """Configs of replicas: each its own data dir, all on one database file and one Redis."""
    db = tmp_path / "shared.db"

    def make(name: str, **overrides: Any) -> Config:
        return make_config(data_dir=str(tmp_path / name), db_url=f"sqlite:///{db}",
                           socketio_redis_url=redis_url, **overrides)
    return make


async def until(check: Callable[[], Any], what: str, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def pair(aiohttp_server: Factory, replica_config: Callable[..., Config]
               ) -> AsyncIterator[tuple[TestServer, TestServer]]:
    a = await aiohttp_server(build_app(replica_config("a"), backend_factory=None))
    b = await aiohttp_server(build_app(replica_config("b"), backend_factory=None))
    yield a, b


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_a_session_minted_by_one_replica_carries_its_discussion_to_another(
        pair: tuple[TestServer, TestServer]) -> None:
    a, b = pair
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(base(a) + "/new_discussion", params={"title": "from a"}) as r:
            assert r.status == 200
            created = await r.json()
        cookie = jar.filter_cookies(a.make_url("/"))[COOKIE_NAME].value
        # B accepts A's cookie (same secret) and knows the session's discussion
        async with http.post(base(b) + "/rename", json={"title": "renamed on b"}) as r:
            assert r.status == 200, await r.text()
            assert COOKIE_NAME not in r.cookies  # no new session: the cookie verified
        async with http.get(base(a) + "/list_discussions") as r:
            assert await r.json() == [{"id": created["id"], "title": "renamed on b"}]
        # a change made through B is what A sees next
        async with http.get(base(b) + "/new_discussion", params={"title": "second"}) as r:
            second = (await r.json())["id"]
        async with http.get(base(a) + "/export_discussion") as r:
            assert r.status == 200
        assert a.app[SESSIONS].get(cookie) is not None
        assert a.app[SESSIONS].get(cookie).discussion_id == second  # type: ignore[union-attr]


async def test_a_restarted_replica_remembers_the_open_discussion(
        aiohttp_server: Factory, replica_config: Callable[..., Config]) -> None:
    first = await aiohttp_server(build_app(replica_config("a"), backend_factory=None))
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(base(first) + "/new_discussion", params={"title": "kept"}) as r:
            kept = (await r.json())["id"]
        await first.close()
        again = await aiohttp_server(build_app(replica_config("a"), backend_factory=None))
        async with http.post(again.make_url("/rename"), json={"title": "still open"}) as r:
            assert r.status == 200, await r.text()
        async with http.get(again.make_url("/list_discussions")) as r:
            assert await r.json() == [{"id": kept, "title": "still open"}]


async def test_stop_gen_through_one_replica_stops_a_generation_on_another(
        aiohttp_server: Factory, replica_config: Callable[..., Config]) -> None:
    gate = threading.Semaphore(0)
    config = replica_config("a", override_personality_model_parameters=True, n_predict=500,
                            ctx_size=2048, parallel=1)
    a = await aiohttp_server(build_app(config, backend_factory=scripted_loader(
        [b"a"], eog_after=False, gate=gate)))
    b = await aiohttp_server(build_app(replica_config("b"), backend_factory=None))
    browser = await Browser.open(base(a))
    try:
        await browser.sio.emit("generate_msg", {"prompt": "hi"})
        gate.release(3)
        await asyncio.wait_for(browser.first_message.wait(), 10)
        async with browser.http.get(base(b) + "/stop_gen") as r:  # same cookie, replica B
            assert r.status == 200
        gate.release(100_000)
        final = await asyncio.wait_for(browser.finals.get(), 20)
        assert final["finish_reason"] != "length" and len(final["data"]) < 500
    finally:
        gate.release(100_000)
        await browser.close()


async def test_settings_changes_and_saves_reach_every_replica(
        pair: tuple[TestServer, TestServer], tmp_path: Path) -> None:
    a, b = pair
    async with aiohttp.ClientSession() as http:
        async with http.post(base(a) + "/update_setting",
                             json={"setting_name": "temperature", "setting_value": 0.25}) as r:
            assert (await r.json())["status"] is True
        await until(lambda: b.app[SETTINGS].config.temperature == 0.25, "B's temperature")
        # an invalid value is refused where it is sent and never reaches the other
        async with http.post(base(b) + "/update_setting",
                             json={"setting_name": "top_k", "setting_value": -4}) as r:
            assert r.status == 400
        async with http.post(base(b) + "/save_settings") as r:
            assert (await r.json())["status"] is True
        saved_a = tmp_path / "a" / "local_config.yaml"
        await until(saved_a.exists, "A's saved configuration")
        assert "temperature: 0.25" in saved_a.read_text(encoding="utf-8")
        assert a.app[SETTINGS].config.top_k == b.app[SETTINGS].config.top_k


async def test_a_deleted_discussion_is_no_replicas_current_one(
        pair: tuple[TestServer, TestServer]) -> None:
    a, b = pair
    reader = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with reader.get(base(b) + "/new_discussion", params={"title": "doomed"}) as r:
            doomed = (await r.json())["id"]
        async with aiohttp.ClientSession() as other:
            async with other.post(base(a) + "/delete_discussion", json={"id": doomed}) as r:
                assert r.status == 200, await r.text()
        sessions = b.app[SESSIONS]
        await until(lambda: all(s.discussion_id != doomed
                                for s in sessions._sessions.values()), "B forgets it")
        async with reader.post(base(b) + "/rename", json={"title": "x"}) as r:
            assert r.status == 409  # nothing selected any more
    finally:
        await reader.close()


async def test_no_session_cookie_on_engineio_requests_behind_the_proxy(
        pair: tuple[TestServer, TestServer]) -> None:
    """The proxy hashes cookieless clients by address and others by cookie: a cookie set
    on the handshake would send the connection's next poll elsewhere."""
    a, _ = pair
    async with aiohttp.ClientSession() as http:
        async with http.get(base(a) + "/socket.io/", params={"EIO": "4",
                                                             "transport": "polling"}) as r:
            assert r.status == 200
            assert COOKIE_NAME not in r.cookies
        async with http.get(base(a) + "/list_discussions") as r:  # other routes still do
            assert COOKIE_NAME in r.cookies


async def test_a_replica_that_cannot_reach_redis_refuses_to_start(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    from chatkit import free_port

    config = make_config(socketio_redis_url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(ClusterError) as failed:
        await aiohttp_server(build_app(config, backend_factory=None))
    assert "cannot reach Redis" in str(failed.value) and "hunter2" not in str(failed.value)


async def test_the_session_secret_survives_redis_losing_its_data(
        aiohttp_server: Factory, replica_config: Callable[..., Config], redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted empty: the running replica puts its secret back, so a replica
    started afterwards takes the same one and accepts the cookies minted before; a secret
    another replica put there first is adopted by all."""
    from redis import asyncio as aioredis

    from lollms_fast.services import cluster

    monkeypatch.setattr(cluster, "SECRET_CHECK_S", 0.05)
    a = await aiohttp_server(build_app(replica_config("a"), backend_factory=None))
    sessions_a = a.app[SESSIONS]
    minted = sessions_a.mint_id()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        for _ in range(200):  # A puts its secret back within a few checks
            if await client.get(cluster.SECRET_KEY) is not None:
                break
            await asyncio.sleep(0.02)
        assert await client.get(cluster.SECRET_KEY) is not None
        b = await aiohttp_server(build_app(replica_config("b"), backend_factory=None))
        assert b.app[SESSIONS].is_minted(minted)  # B took A's secret
        await client.set(cluster.SECRET_KEY, b"another secret, set by some replica")
        await until(lambda: not sessions_a.is_minted(minted)
                    and not b.app[SESSIONS].is_minted(minted), "both adopt the new secret")
        fresh = sessions_a.mint_id()
        assert b.app[SESSIONS].is_minted(fresh)
    finally:
        await client.aclose()
