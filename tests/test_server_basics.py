"""The server skeleton on a real port: JSON errors, body limit, API key, Socket.IO handshake."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import socketio
from aiohttp.test_utils import TestClient

from lollms_fast.app import build_app
from lollms_fast.config import Config

ClientFactory = Callable[..., Any]


@pytest.fixture
async def bare_client(aiohttp_client: ClientFactory,
                      make_config: Callable[..., Config]) -> TestClient:
    return await aiohttp_client(build_app(make_config(max_body_size=4096),
                                          backend_factory=None))


async def test_get_config_answers_json(bare_client: TestClient) -> None:
    resp = await bare_client.get("/get_config")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    data = await resp.json()
    assert data["binding"] == "llama_cpp" and data["parallel"] == 4


async def test_unknown_route_is_json_404(bare_client: TestClient) -> None:
    resp = await bare_client.get("/no/such/route")
    assert resp.status == 404
    assert (await resp.json())["status"] is False


async def test_wrong_method_is_json_405(bare_client: TestClient) -> None:
    resp = await bare_client.post("/get_config", data=b"{}")
    assert resp.status == 405
    body = await resp.json()
    assert body["status"] is False and body["error"]
    assert "GET" in resp.headers["Allow"]


async def test_oversize_body_is_413(bare_client: TestClient) -> None:
    """A JSON body over max_body_size (4096 here) sent to a route that reads one is a 413
    (not the 405 of a GET-only route, which never looks at the body)."""
    body = b'{"id": 1, "padding": "' + b"x" * 10000 + b'"}'
    resp = await bare_client.post("/load_discussion", data=body,
                                  headers={"Content-Type": "application/json"})
    assert resp.status == 413
    err = await resp.json()
    assert err["status"] is False and err["error"]


async def test_api_key_required_when_set(aiohttp_client: ClientFactory,
                                         make_config: Callable[..., Config]) -> None:
    client = await aiohttp_client(build_app(make_config(api_key="letmein"),
                                            backend_factory=None))
    assert (await client.get("/get_config")).status == 401
    wrong = await client.get("/get_config", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    ok = await client.get("/get_config", headers={"Authorization": "Bearer letmein"})
    assert ok.status == 200
    assert (await ok.json())["api_key"] == "********"
    ok2 = await client.get("/get_config", headers={"X-API-Key": "letmein"})
    assert ok2.status == 200


async def test_socketio_handshake(bare_client: TestClient) -> None:
    sio = socketio.AsyncClient()
    await sio.connect(str(bare_client.make_url("/")), transports=["websocket"])
    assert sio.connected
    await sio.disconnect()


async def test_socketio_refuses_missing_key(aiohttp_client: ClientFactory,
                                            make_config: Callable[..., Config]) -> None:
    client = await aiohttp_client(build_app(make_config(api_key="k"), backend_factory=None))
    url = str(client.make_url("/"))
    refused = socketio.AsyncClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(url, transports=["websocket"])
    accepted = socketio.AsyncClient()
    await accepted.connect(url, transports=["websocket"], auth={"api_key": "k"})
    assert accepted.connected
    await accepted.disconnect()


async def test_api_key_leaves_the_web_ui_public(aiohttp_client: ClientFactory,
                                                make_config: Callable[..., Config]) -> None:
    """A browser loads the page and its files first, then asks its user for the key."""
    client = await aiohttp_client(build_app(make_config(api_key="letmein"),
                                            backend_factory=None))
    assert (await client.get("/")).status == 200
    assert (await client.get("/settings")).status == 200
    assert (await client.get("/app.js")).status == 200
    assert (await client.get("/no-such-file.js")).status == 404
    assert (await client.get("/list_discussions")).status == 401
    assert (await client.post("/update_setting", json={})).status == 401


async def test_socketio_websocket_is_served_without_compression(
        bare_client: TestClient) -> None:
    """Per-piece frames are tiny; zlib on each would cost CPU the model needs."""
    ws = await bare_client.ws_connect("/socket.io/?EIO=4&transport=websocket", compress=15)
    try:
        assert ws.compress == 0  # the server declined permessage-deflate
        opening = await ws.receive_str()
        assert opening.startswith("0{")  # Engine.IO open packet
    finally:
        await ws.close()
