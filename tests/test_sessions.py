"""Sessions (SPEC "Sessions", issue 11): the `lollms_session` cookie is set on the first
response a client gets, whatever it is, so a page that opens its Socket.IO connection before
any API call shares one session with its later HTTP calls. Clients that keep no cookie (a
script) still get one session per request or connection.

The generation tests use the scripted backend (tests/fakes.py): they are about which
discussion the events name, not about the text. tests/test_ui_session_browser.py runs the
same story in Chromium on the real model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import socketio
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from fakes import ScriptedBackend
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.engine import Engine
from lollms_fast.server.keys import SESSIONS
from lollms_fast.services.sessions import COOKIE_NAME, IDLE_TTL_S, SessionStore

Factory = Callable[..., Any]
HANDSHAKE = "/socket.io/?EIO=4&transport=polling"
ANSWER = [b"Hello", b" from", b" the", b" script."]

# ------------------------------------------------------------------ the store's ids


def test_minted_ids_verify_and_others_do_not() -> None:
    store, other = SessionStore(), SessionStore()
    minted = store.mint_id()
    assert store.is_minted(minted)
    assert store.mint_id() != minted
    nonce, _, tag = minted.partition(".")
    flipped = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    for forged in ("", "forged", nonce, f"{nonce}.", f".{tag}", f"{nonce}.{flipped}",
                   f"x{nonce}.{tag}", f"{nonce}.{tag}x", f"{nonce}.{tag}.{tag}",
                   "é." + tag, f"{nonce}.ünï", other.mint_id()):
        assert not store.is_minted(forged), forged
    assert len(store) == 0  # minting and checking create no session


def test_get_or_create_keeps_minted_ids_only() -> None:
    store = SessionStore()
    minted = store.mint_id()
    session, created = store.get_or_create(minted)
    assert created and session.id == minted
    assert store.get_or_create(minted) == (session, False)
    forged, created = store.get_or_create("chosen-by-the-client")
    assert created and forged.id != "chosen-by-the-client" and store.is_minted(forged.id)
    fresh, created = store.get_or_create(None)
    assert created and store.is_minted(fresh.id)
    assert len(store) == 3


def test_a_forgotten_session_comes_back_empty_under_its_id() -> None:
    now = [0.0]
    store = SessionStore(max_sessions=2, ttl=10, clock=lambda: now[0])
    first, _ = store.get_or_create(store.mint_id())
    first.select(7, 8)
    store.create()
    store.create()  # LRU: the first one is evicted
    assert store.get(first.id) is None
    again, created = store.get_or_create(first.id)
    assert created and again.id == first.id and again.discussion_id is None
    now[0] = 11.0  # idle past the TTL
    assert store.get(first.id) is None


# ------------------------------------------------------------------ the cookie on responses


def issued(client: TestClient, resp: aiohttp.ClientResponse) -> str | None:
    """The session id this response set as the cookie (checked to be a minted one)."""
    values = [v for v in resp.headers.getall("Set-Cookie", [])
              if v.startswith(COOKIE_NAME + "=")]
    if not values:
        return None
    assert len(values) == 1, values
    morsel = resp.cookies[COOKIE_NAME]
    assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/"
    assert int(morsel["max-age"]) == IDLE_TTL_S
    assert not morsel["secure"]  # plain HTTP here
    assert client.server.app[SESSIONS].is_minted(morsel.value)
    return morsel.value


async def first_contact(client: TestClient, method: str, path: str, **kw: Any
                        ) -> tuple[int, str | None]:
    client.session.cookie_jar.clear()
    async with client.request(method, path, **kw) as resp:
        await resp.read()
        return resp.status, issued(client, resp)


FIRST_RESPONSES = [
    ("GET", "/", 200),  # the UI page
    ("GET", "/settings/", 200),
    ("GET", "/sio.js", 200),  # a static file
    ("HEAD", "/style.css", 200),
    ("GET", "/list_discussions", 200),
    ("GET", "/get_generation_status", 200),
    ("GET", "/no_such_file.js", 404),
    ("PUT", "/load_discussion", 405),  # raised by the router
    ("POST", "/load_discussion", 415),  # no body: the errors middleware's response
    ("GET", HANDSHAKE, 200),  # the Engine.IO polling handshake
]


@pytest.mark.parametrize(("method", "path", "status"), FIRST_RESPONSES)
async def test_the_first_response_of_any_kind_sets_the_cookie(
        rest_client: TestClient, method: str, path: str, status: int) -> None:
    got, session_id = await first_contact(rest_client, method, path)
    assert got == status
    assert session_id is not None
    # no session is stored for it until something needs one
    if path in ("/", "/settings/", "/sio.js", "/style.css", "/no_such_file.js"):
        assert len(rest_client.server.app[SESSIONS]) == 0


@pytest.mark.parametrize(("method", "path", "status"), FIRST_RESPONSES)
async def test_a_valid_cookie_is_not_set_again(
        rest_client: TestClient, method: str, path: str, status: int) -> None:
    _, session_id = await first_contact(rest_client, "GET", "/sio.js")
    async with rest_client.request(method, path) as resp:
        await resp.read()
        assert resp.status == status
        assert issued(rest_client, resp) is None
        assert resp.request_info.headers["Cookie"] == f"{COOKIE_NAME}={session_id}"


@pytest.mark.parametrize("cookie", ["forged", "a.b", "x" * 200])
async def test_a_forged_cookie_gets_a_fresh_valid_one(rest_client: TestClient,
                                                      cookie: str) -> None:
    status, session_id = await first_contact(rest_client, "GET", "/list_discussions",
                                             cookies={COOKIE_NAME: cookie})
    assert status == 200 and session_id is not None and session_id != cookie


async def test_a_401_sets_the_cookie_too(aiohttp_client: Factory,
                                         make_config: Callable[..., Config]) -> None:
    client = await aiohttp_client(build_app(make_config(api_key="k"), backend_factory=None))
    status, session_id = await first_contact(client, "GET", "/list_discussions")
    assert status == 401 and session_id is not None
    # with the key, the same cookie carries the session on
    async with client.get("/new_discussion", headers={"X-API-Key": "k"}) as resp:
        assert resp.status == 200 and issued(client, resp) is None


async def test_the_websocket_upgrade_sets_the_cookie(rest_client: TestClient) -> None:
    rest_client.session.cookie_jar.clear()
    ws = await rest_client.ws_connect("/socket.io/?EIO=4&transport=websocket")
    try:
        assert (await ws.receive_str()).startswith("0{")
    finally:
        await ws.close()
    jar = rest_client.session.cookie_jar.filter_cookies(rest_client.make_url("/"))
    assert rest_client.server.app[SESSIONS].is_minted(jar[COOKIE_NAME].value)


async def test_cookieless_requests_get_independent_sessions(rest_client: TestClient) -> None:
    ids = {(await first_contact(rest_client, "GET", "/sio.js"))[1] for _ in range(5)}
    assert len(ids) == 5
    status, _ = await first_contact(rest_client, "GET", "/new_discussion")
    assert status == 200
    # the discussion made current above belongs to a session this request does not carry
    status, _ = await first_contact(rest_client, "POST", "/rename", json={"title": "x"})
    assert status == 409


async def test_a_session_forgotten_by_the_store_keeps_its_cookie(
        rest_client: TestClient) -> None:
    _, session_id = await first_contact(rest_client, "GET", "/new_discussion")
    sessions = rest_client.server.app[SESSIONS]
    sessions._sessions.clear()  # as an LRU eviction or idle expiry would
    async with rest_client.post("/rename", json={"title": "x"}) as resp:
        assert resp.status == 409  # its state is gone ...
        assert issued(rest_client, resp) is None  # ... but not its id: no new cookie
    assert sessions.get(session_id) is not None


# ------------------------------------------------------------------ socket + HTTP, scripted


def scripted_loader(config: Config) -> Engine:
    engine = Engine(ScriptedBackend(ANSWER), parallel=config.parallel,
                    n_ctx_slot=config.ctx_size, n_batch=config.n_batch,
                    queue_size=config.queue_size)
    engine.start()
    return engine


@pytest.fixture
async def scripted(aiohttp_server: Factory, make_config: Callable[..., Config]) -> TestServer:
    config = make_config(override_personality_model_parameters=True, n_predict=16,
                         parallel=2)
    server: TestServer = await aiohttp_server(build_app(config,
                                                        backend_factory=scripted_loader))
    return server


class Page:
    """A client that keeps cookies like a browser: one aiohttp session (cookie jar) for its
    HTTP calls and for the socket's Engine.IO requests."""

    def __init__(self, base: str, *, keep_cookies: bool = True) -> None:
        self.base = base
        jar: aiohttp.abc.AbstractCookieJar = (aiohttp.CookieJar(unsafe=True) if keep_cookies
                                              else aiohttp.DummyCookieJar())
        self.http = aiohttp.ClientSession(cookie_jar=jar)
        self.sio = socketio.AsyncClient(reconnection=False, http_session=self.http)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.finals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for name in ("infos", "message", "final"):
            self.sio.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[[dict[str, Any]], Any]:
        async def record(data: dict[str, Any]) -> None:
            self.events.append((name, data))
            if name == "final":
                await self.finals.put(data)
        return record

    def cookie(self) -> str | None:
        morsel = self.http.cookie_jar.filter_cookies(URL(self.base)).get(COOKIE_NAME)
        return morsel.value if morsel is not None else None

    async def connect(self, *, transports: list[str], headers: dict[str, str] | None = None
                      ) -> None:
        await self.sio.connect(self.base, transports=transports, headers=headers or {},
                               wait_timeout=10)

    async def http_json(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, self.base + path, **kw) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def generate(self, prompt: str) -> dict[str, Any]:
        await self.sio.emit("generate_msg", {"prompt": prompt})
        return await asyncio.wait_for(self.finals.get(), 60)

    async def close(self) -> None:
        await self.sio.disconnect()
        await self.http.close()


@pytest.fixture
async def pages(scripted: TestServer) -> AsyncIterator[Callable[..., Page]]:
    opened: list[Page] = []

    def open_page(**kw: Any) -> Page:
        opened.append(Page(str(scripted.make_url("")).rstrip("/"), **kw))
        return opened[-1]

    yield open_page
    for page in opened:
        await page.close()


def assert_all_name(page: Page, discussion_id: int) -> None:
    streamed = [(name, data) for name, data in page.events if name in ("message", "final")]
    assert [n for n, _ in streamed].count("final") == 1
    assert any(n == "message" for n, _ in streamed)
    assert {data["discussion_id"] for _, data in streamed} == {discussion_id}


async def assert_saved(page: Page, discussion_id: int, final: dict[str, Any]) -> None:
    rows = await page.http_json("POST", "/load_discussion", json={"id": discussion_id})
    saved = {row["id"]: row for row in rows}
    assert saved[final["ai_message_id"]]["content"] == final["data"] == "Hello from the script."


# A polling handshake then an upgrade, as socket.io-client connects. (Not polling only: the
# python-socketio client's disconnect then waits for its pending long poll, about a minute.)
UPGRADE = ["polling", "websocket"]


@pytest.mark.parametrize("transports", [UPGRADE, ["websocket"]])
async def test_a_socket_opened_first_shares_the_session_with_later_http_calls(
        pages: Callable[..., Page], transports: list[str]) -> None:
    """The socket is the client's very first contact: its handshake response sets the
    cookie, the page's HTTP calls carry it, and the answer lands in their discussion."""
    page = pages()
    await page.connect(transports=transports)
    assert page.cookie() is not None
    created = await page.http_json("GET", "/new_discussion", params={"title": "mine"})
    final = await page.generate("hi")
    assert final["finish_reason"] == "stop"
    assert_all_name(page, created["id"])
    await assert_saved(page, created["id"], final)


async def test_a_polling_handshake_with_the_page_cookie_shares_its_session(
        pages: Callable[..., Page]) -> None:
    """The 2023 order: the page sets the cookie, the socket connects with it (polling, then
    upgrade), then the page creates a discussion over HTTP and prompts on the socket."""
    page = pages()
    async with page.http.get(page.base + "/") as resp:
        assert resp.status == 200
    cookie = page.cookie()
    assert cookie is not None
    script = pages(keep_cookies=False)  # the socket side: only the Cookie header we give it
    await script.connect(transports=UPGRADE,
                         headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    created = await page.http_json("GET", "/new_discussion", params={"title": "mine"})
    final = await script.generate("hi")
    assert_all_name(script, created["id"])
    await assert_saved(page, created["id"], final)


async def test_cookieless_sockets_get_sessions_of_their_own(
        pages: Callable[..., Page]) -> None:
    http_only = pages(keep_cookies=False)
    created = await http_only.http_json("GET", "/new_discussion", params={"title": "http"})
    first, second = pages(keep_cookies=False), pages(keep_cookies=False)
    await first.connect(transports=UPGRADE)
    await second.connect(transports=["websocket"])
    a, b = await first.generate("hi"), await second.generate("hi")
    ids = {a["discussion_id"], b["discussion_id"], created["id"]}
    assert len(ids) == 3
    assert_all_name(first, a["discussion_id"])
    assert_all_name(second, b["discussion_id"])


class _SlowMirror:
    """A mirror whose read is held until the test releases it, answering `stale`."""

    def __init__(self, stale: tuple[int | None, int | None]) -> None:
        self.secret = b"s" * 32
        self.stale = stale
        self.release = asyncio.Event()
        self.reading = asyncio.Event()
        self.saved: list[tuple[str, int | None, int | None]] = []

    def save_session(self, session_id: str, discussion_id: int | None,
                     last_message_id: int | None) -> None:
        self.saved.append((session_id, discussion_id, last_message_id))

    async def flush(self) -> None:
        return None

    async def load_session(self, session_id: str) -> tuple[int | None, int | None] | None:
        assert session_id
        self.reading.set()
        await self.release.wait()
        return self.stale

    async def publish(self, op: str, **fields: object) -> None:  # noqa: ARG002
        return None


async def test_a_change_made_while_the_shared_store_answers_is_kept() -> None:
    """Two requests of one browser at once: the one reading the session from Redis must
    not put back the state the other has just changed."""
    store = SessionStore()
    mirror = _SlowMirror(stale=(1, 10))
    store.attach(mirror)
    session, _ = store.get_or_create(store.mint_id())
    reading = asyncio.ensure_future(store.fetch(session.id))
    await mirror.reading.wait()
    session.select(2, 20)  # the other request, meanwhile
    mirror.release.set()
    assert await reading is session
    assert (session.discussion_id, session.last_message_id) == (2, 20)
    assert mirror.saved[-1] == (session.id, 2, 20)
    # with nothing changed meanwhile, the shared state wins
    mirror.release.clear()
    mirror.reading.clear()
    again = asyncio.ensure_future(store.fetch(session.id))
    await mirror.reading.wait()
    mirror.release.set()
    await again
    assert (session.discussion_id, session.last_message_id) == (1, 10)
