"""Three replicas behind the shipped nginx configuration (deploy/nginx.conf), on one real
PostgreSQL and one real Redis, each replica a real server process with the real default
model (n_threads 1: the 2 cores are shared). Browsers (an HTTP session and a Socket.IO
connection sharing its cookie) reach them only through nginx, as in production.

- clients spread over the replicas, each one sticky (HTTP and its WebSocket);
- what one replica stores, every other lists;
- stop_gen sent through another replica stops the answer (HTTP route and socket event);
- a replica killed with SIGKILL loses no stored data, and its clients' next requests
  succeed on another replica, which knows their open discussion (the session is in Redis).

The test that kills a replica runs last (pytest keeps the file order).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import socketio

from chatkit import (
    COUNT_PROMPT,
    Browser,
    ServerProcess,
    free_port,
    install_counter_personality,
    spawn_server,
)
from proxykit import UPSTREAM_HEADER, NginxServer
from servicekit import RedisServer

pytestmark = pytest.mark.slow

REPLICAS = 3
N_PREDICT = 300


@dataclass
class Stack:
    replicas: list[ServerProcess]
    nginx: NginxServer

    @property
    def url(self) -> str:
        return self.nginx.url

    def replica_at(self, upstream: str) -> ServerProcess:
        port = int(upstream.rsplit(":", 1)[1])
        return next(r for r in self.replicas if r.port == port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path,
          postgres_server: Any) -> Iterator[Stack]:
    db_url = postgres_server.create_database()
    with ExitStack() as stack, RedisServer() as redis:
        env = {"LOLLMS_DB_URL": db_url, "LOLLMS_SOCKETIO_REDIS_URL": redis.url,
               "LOLLMS_PERSONALITY": "counter", "LOLLMS_TEMPERATURE": "0",
               "LOLLMS_REPEAT_PENALTY": "1.0", "LOLLMS_N_PREDICT": str(N_PREDICT),
               "LOLLMS_OVERRIDE_PERSONALITY_MODEL_PARAMETERS": "true"}
        replicas = []
        for i in range(REPLICAS):
            data = tmp_path_factory.mktemp(f"replica{i}")
            install_counter_personality(data)
            replicas.append(stack.enter_context(spawn_server(
                data, default_model_path, "--n-threads", "1", "--parallel", "2",
                "--ctx-size", "1024", env=env)))
        nginx = stack.enter_context(NginxServer([r.port for r in replicas], free_port()))
        yield Stack(replicas, nginx)


async def upstream_of(b: Browser, path: str = "/list_discussions") -> str:
    async with b.http.get(path) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers[UPSTREAM_HEADER]


async def open_browsers(stack: Stack, n: int) -> list[Browser]:
    return [await Browser.open(stack.url) for _ in range(n)]


async def test_clients_spread_stick_and_see_each_others_discussions(stack: Stack) -> None:
    browsers = await open_browsers(stack, 12)
    try:
        homes = []
        for b in browsers:
            seen = {await upstream_of(b) for _ in range(3)}
            assert len(seen) == 1, f"a client moved between replicas: {seen}"
            homes.append(seen.pop())
        assert len(set(homes)) >= 2, "every client landed on one replica"
        created = {}
        for i, b in enumerate(browsers):
            status, body = await b.get("/new_discussion", title=f"from client {i}")
            assert status == 200, body
            created[body["id"]] = f"from client {i}"
        for b in browsers:
            status, listed = await b.get("/list_discussions")
            assert status == 200
            titles = {d["id"]: d["title"] for d in listed}
            assert all(titles.get(k) == v for k, v in created.items())
        # the socket reaches the client's own replica: a stop through it finds the answer
        b = browsers[0]
        await b.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(b.first_message.wait(), 60)
        await b.sio.emit("stop_gen")
        final = await asyncio.wait_for(b.finals.get(), 60)
        assert final["data"] and final["finish_reason"] != "length"
    finally:
        for b in browsers:
            await b.close()


async def test_stop_gen_through_another_replica_stops_the_answer(stack: Stack) -> None:
    b = await Browser.open(stack.url)
    cookie = "; ".join(f"{c.key}={c.value}" for c in b.http.cookie_jar)
    home = stack.replica_at(await upstream_of(b))
    other = next(r for r in stack.replicas if r is not home)
    try:
        # through the other replica's HTTP route (it publishes the stop to every replica)
        await b.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(b.first_message.wait(), 60)
        async with aiohttp.ClientSession(headers={"Cookie": cookie}) as direct:
            async with direct.get(other.base + "/stop_gen") as resp:
                assert resp.status == 200
        final = await asyncio.wait_for(b.finals.get(), 60)
        assert final["finish_reason"] != "length" and final["data"].count(",") < N_PREDICT

        # through a socket event sent to the other replica by a second connection
        b.first_message.clear()
        second = socketio.AsyncClient(reconnection=False)
        await second.connect(other.base, headers={"Cookie": cookie},
                             transports=["websocket"], wait_timeout=10)
        try:
            await b.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
            await asyncio.wait_for(b.first_message.wait(), 60)
            await second.emit("stop_gen")
            final = await asyncio.wait_for(b.finals.get(), 60)
            assert final["finish_reason"] != "length"
        finally:
            await second.disconnect()
    finally:
        await b.close()


async def test_engineio_polling_of_a_client_that_keeps_cookies_stays_on_one_replica(
        stack: Stack) -> None:
    """A script whose first contact is the Engine.IO handshake, with a cookie jar: nginx
    routes it by address; were the handshake to set a session cookie, its next request
    would be routed by that cookie, to another replica most of the time, which does not
    know the Engine.IO session (400)."""
    for _ in range(6):
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            query = {"EIO": "4", "transport": "polling"}
            async with http.get(stack.url + "/socket.io/", params=query) as resp:
                assert resp.status == 200
                opened = orjson.loads((await resp.read())[1:])
                first = resp.headers[UPSTREAM_HEADER]
            async with http.post(stack.url + "/socket.io/", data=b"40",
                                 params={**query, "sid": opened["sid"]}) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers[UPSTREAM_HEADER] == first


async def export_all(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/export") as resp:
            assert resp.status == 200
            return list(await resp.json())


async def test_killing_a_replica_loses_nothing_and_its_clients_move(stack: Stack) -> None:
    browsers = await open_browsers(stack, 9)
    try:
        homes = [stack.replica_at(await upstream_of(b)) for b in browsers]
        victim = max(stack.replicas, key=homes.count)  # the replica with the most clients
        mine = [b for b, h in zip(browsers, homes, strict=True) if h is victim]
        opened = []
        for i, b in enumerate(mine):
            status, body = await b.get("/new_discussion", title=f"before the kill {i}")
            assert status == 200
            opened.append(body["id"])
        # one of them is answering when its replica dies: what was stored stays
        writer = mine[0]
        await writer.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(writer.first_message.wait(), 60)
        before = await export_all(stack.url)

        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()

        survivors = [r for r in stack.replicas if r is not victim]
        after = await export_all(survivors[0].base)
        by_id = {d["id"]: d for d in after}
        for d in before:
            kept = by_id[d["id"]]
            assert kept["title"] == d["title"]
            stored = {m["id"]: m for m in kept["messages"]}
            for m in d["messages"]:
                assert m["id"] in stored  # no row is lost (a partial answer may have grown)
                if m["sender"] != "counter":
                    assert stored[m["id"]] == m

        for b in mine:  # their next requests succeed elsewhere, their session intact
            async with b.http.post("/rename", json={"title": "renamed after the kill"}) as r:
                assert r.status == 200, await r.text()
                assert r.headers[UPSTREAM_HEADER] != f"127.0.0.1:{victim.port}"
        _, listed = await mine[0].get("/list_discussions")
        titles = {d["id"]: d["title"] for d in listed}
        assert all(titles[i] == "renamed after the kill" for i in opened)

        # a new socket through nginx reaches a live replica and can generate
        again = await Browser.open(stack.url)
        try:
            await again.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
            await asyncio.wait_for(again.first_message.wait(), 60)
            await again.sio.emit("stop_gen")
            final = await asyncio.wait_for(again.finals.get(), 60)
            assert final["data"]
        finally:
            await again.close()
    finally:
        for b in browsers:
            await b.close()
