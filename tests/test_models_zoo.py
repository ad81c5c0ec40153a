"""The model zoo (`/get_available_models`) and `install_model` / `uninstall_model` over a real
Socket.IO connection. Downloads come from a file server started inside the test on
127.0.0.1 (serving a small GGUF written with the `gguf` package): nothing leaves the machine.
Because that server is on loopback, tests of successful installs turn the setting
`allow_private_downloads` on, which is what the setting is for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import gguf
import numpy as np
import pytest
import socketio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.server.keys import SETTINGS
from lollms_fast.services.models import (
    PACKAGED_CATALOG,
    is_public_address,
    model_name_from_url,
)

Factory = Callable[..., Any]
RestClient = TestClient[web.Request, web.Application]
ZOO_KEYS = {"title", "icon", "license", "owner", "owner_link", "description", "isInstalled",
            "path", "filesize", "model_type"}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A valid GGUF file of about 1 MiB (one tensor), written with the `gguf` package."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("weights", np.arange(1 << 18, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    assert data[:4] == b"GGUF"
    return data


@dataclass
class FileServer:
    """What the local download server saw and the knobs of its slow route."""

    base: str = ""
    requests: list[str] = field(default_factory=list)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_finished: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def files(aiohttp_server: Factory, tiny_gguf: bytes) -> FileServer:
    seen = FileServer()

    async def log_request(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.requests.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    async def model(_request: web.Request) -> web.Response:
        return web.Response(body=tiny_gguf, content_type="application/octet-stream")

    async def html(_request: web.Request) -> web.Response:
        return web.Response(text="<html>" + "not a model " * 100 + "</html>",
                            content_type="text/html")

    async def truncated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(tiny_gguf)
        await resp.prepare(request)
        await resp.write(tiny_gguf[: len(tiny_gguf) // 2])
        assert request.transport is not None
        request.transport.close()  # the connection drops half-way
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(tiny_gguf)
        await resp.prepare(request)
        await resp.write(tiny_gguf[:4096])
        seen.slow_started.set()
        try:
            await seen.release.wait()  # never set: the client must give up
        finally:
            seen.slow_finished.set()
        return resp

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/files/tiny.gguf"))

    app = web.Application(middlewares=[web.middleware(log_request)])
    app.router.add_get("/files/tiny.gguf", model)
    app.router.add_get("/files/other-name.gguf", model)
    app.router.add_get("/files/page.gguf", html)
    app.router.add_get("/files/truncated.gguf", truncated)
    app.router.add_get("/files/slow.gguf", slow)
    app.router.add_get("/files/moved.gguf", redirect)
    server = await aiohttp_server(app)
    seen.base = str(server.make_url("/files")).rstrip("/")
    return seen


async def lollms_server(aiohttp_server: Factory, make_config: Callable[..., Config],
                        **overrides: Any) -> TestServer:
    config = make_config(**overrides)
    server: TestServer = await aiohttp_server(build_app(config, backend_factory=None))
    return server


def models_dir(server: TestServer) -> Path:
    return server.app[SETTINGS].config.models_dir


def leftovers(folder: Path) -> list[str]:
    """Every entry of the models folder, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


class Client:
    """A Socket.IO client recording `install_progress` events."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sio.on("install_progress", self.events.put)

    async def connect(self, server: TestServer) -> Client:
        await self.sio.connect(str(server.make_url("")).rstrip("/"),
                               transports=["websocket"], wait_timeout=10)
        return self

    async def until_done(self, event: str, path: str) -> list[dict[str, Any]]:
        """Emit `event` {"path"} and collect install_progress up to succeeded / failed."""
        await self.sio.emit(event, {"path": path})
        seen = []
        while True:
            payload = await asyncio.wait_for(self.events.get(), 60)
            seen.append(payload)
            if payload["status"] != "progress":
                return seen

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@pytest.fixture
async def open_client() -> AsyncIterator[Callable[[TestServer], Any]]:
    clients: list[Client] = []

    async def open_(server: TestServer) -> Client:
        client = await Client().connect(server)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


# ---------------------------------------------------------------- the zoo


async def get_zoo(client: RestClient) -> list[dict[str, Any]]:
    resp = await client.get("/get_available_models")
    assert resp.status == 200, await resp.text()
    body: list[dict[str, Any]] = await resp.json()
    assert all(set(entry) == ZOO_KEYS for entry in body)
    return body


def zoo_models_dir(client: RestClient) -> Path:
    assert client.app is not None
    folder = client.app[SETTINGS].config.models_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def test_zoo_lists_the_catalog_then_local_files(rest_client: RestClient) -> None:
    zoo = await get_zoo(rest_client)
    packaged = yaml.safe_load(PACKAGED_CATALOG.read_text(encoding="utf-8"))
    assert [e["title"] for e in zoo] == [p["title"] for p in packaged]
    assert not any(e["isInstalled"] for e in zoo)
    first = zoo[0]
    assert first["path"] == packaged[0]["server"] + "/" + packaged[0]["filename"]
    assert first["model_type"] == "gguf" and isinstance(first["filesize"], int)

    folder = zoo_models_dir(rest_client)
    (folder / packaged[1]["filename"]).write_bytes(b"GGUF" + b"\0" * 96)
    (folder / "zeta.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    (folder / "alpha.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    (folder / "legacy.bin").write_bytes(b"ggml")
    (folder / ".partial.gguf.part").write_bytes(b"GGUF")
    zoo = await get_zoo(rest_client)
    assert len(zoo) == len(packaged) + 2
    by_title = {e["title"]: e for e in zoo}
    catalog_one = by_title[packaged[1]["title"]]
    assert catalog_one["isInstalled"] is True and catalog_one["filesize"] == 100
    assert [e["title"] for e in zoo[len(packaged):]] == ["alpha.gguf", "zeta.gguf"]
    assert by_title["alpha.gguf"] == {
        "title": "alpha.gguf", "icon": by_title["alpha.gguf"]["icon"], "license": "unknown",
        "owner": "", "owner_link": "", "description": by_title["alpha.gguf"]["description"],
        "isInstalled": True, "path": "alpha.gguf", "filesize": 24, "model_type": "gguf"}


async def test_a_catalog_in_the_data_dir_replaces_the_packaged_one(
        rest_client: RestClient, caplog: pytest.LogCaptureFixture) -> None:
    folder = zoo_models_dir(rest_client)
    (folder / "models.yaml").write_text(yaml.safe_dump([
        {"filename": "house.gguf", "server": "https://example.org/m/", "title": "House model",
         "license": "MIT", "owner": "us", "filesize": 1234},
        {"filename": "../escape.gguf", "server": "https://example.org/m"},
        {"filename": "ftp.gguf", "server": "ftp://example.org/m"},
        "not a mapping",
    ]), encoding="utf-8")
    (folder / "mine.gguf").write_bytes(b"GGUF1234")
    with caplog.at_level(logging.WARNING, logger="lollms_fast.models"):
        zoo = await get_zoo(rest_client)
    assert [e["title"] for e in zoo] == ["House model", "mine.gguf"]
    assert zoo[0]["path"] == "https://example.org/m/house.gguf"
    assert zoo[0]["filesize"] == 1234 and zoo[0]["license"] == "MIT"
    assert zoo[0]["isInstalled"] is False
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 3


@pytest.mark.parametrize("text", ["- [unclosed", "just: a mapping", "\x00\x01"])
async def test_a_broken_catalog_still_lists_local_files(
        rest_client: RestClient, caplog: pytest.LogCaptureFixture, text: str) -> None:
    folder = zoo_models_dir(rest_client)
    (folder / "models.yaml").write_text(text, encoding="utf-8")
    (folder / "mine.gguf").write_bytes(b"GGUF")
    with caplog.at_level(logging.WARNING, logger="lollms_fast.models"):
        zoo = await get_zoo(rest_client)
    assert [e["title"] for e in zoo] == ["mine.gguf"]
    assert zoo[0]["isInstalled"] is True
    assert any("unusable" in r.getMessage() for r in caplog.records)


def test_the_packaged_catalog_is_installable() -> None:
    """Every packaged entry is an https GGUF whose install name is its `filename`."""
    entries = yaml.safe_load(PACKAGED_CATALOG.read_text(encoding="utf-8"))
    assert len(entries) >= 4
    for entry in entries:
        url = entry["server"] + "/" + entry["filename"]
        assert url.startswith("https://huggingface.co/") and "/resolve/main/" in url
        assert model_name_from_url(url) == entry["filename"]


# ---------------------------------------------------------------- install


async def test_install_reports_progress_then_succeeds(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory, tiny_gguf: bytes) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    events = await client.until_done("install_model", files.base + "/tiny.gguf")
    assert events[-1] == {"status": "succeeded", "progress": 100, "error": ""}
    progress = events[:-1]
    assert progress and all(e["status"] == "progress" for e in progress)
    percents = [e["progress"] for e in progress]
    assert percents == sorted(percents) and 0 <= percents[0] and percents[-1] <= 100
    folder = models_dir(server)
    assert leftovers(folder) == ["tiny.gguf"]
    assert (folder / "tiny.gguf").read_bytes() == tiny_gguf

    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/get_available_models")) as resp:
            zoo = await resp.json()
    local = [e for e in zoo if e["title"] == "tiny.gguf"]
    assert local and local[0]["isInstalled"] and local[0]["filesize"] == len(tiny_gguf)


async def test_install_follows_a_redirect(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory, tiny_gguf: bytes) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    events = await client.until_done("install_model", files.base + "/moved.gguf")
    assert events[-1]["status"] == "succeeded"
    # the file is named after the URL asked for, not after the redirect target
    assert leftovers(models_dir(server)) == ["moved.gguf"]
    assert (models_dir(server) / "moved.gguf").read_bytes() == tiny_gguf
    assert files.requests == ["/files/moved.gguf", "/files/tiny.gguf"]


@pytest.mark.parametrize("name, error", [
    ("truncated.gguf", "broke off"),
    ("page.gguf", "not a GGUF"),
    ("missing.gguf", "HTTP 404"),
])
async def test_a_failed_download_leaves_nothing(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory, name: str, error: str) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    events = await client.until_done("install_model", f"{files.base}/{name}")
    assert events[-1]["status"] == "failed"
    assert error in events[-1]["error"]
    assert leftovers(models_dir(server)) == []


@pytest.mark.parametrize("url", [
    "file:///etc/passwd.gguf",
    "ftp://{host}/files/tiny.gguf",
    "{base}/../tiny.gguf",
    "{base}/%2e%2e/tiny.gguf",
    "{base}/%2E%2E%2Ftiny.gguf",
    "{base}/sub/..%2ftiny.gguf",
    "{base}/..%5ctiny.gguf",
    "{base}/tiny.bin",
    "{base}/.hidden.gguf",
    "{base}/",
    "tiny.gguf",
    "http:///tiny.gguf",
])
async def test_install_refuses_unsafe_urls(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory, url: str) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    host = files.base.split("//", 1)[1].split("/", 1)[0]
    events = await client.until_done("install_model", url.format(base=files.base, host=host))
    assert events == [{"status": "failed", "progress": 0, "error": events[0]["error"]}]
    assert events[0]["error"]
    assert files.requests == []
    assert leftovers(models_dir(server)) == []
    assert leftovers(models_dir(server).parent) in ([], ["llama_cpp"])


async def test_install_refuses_a_redirect_to_another_scheme(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    events = await client.until_done("install_model",
                                     files.base + "/moved.gguf?to=file:///etc/hostname")
    assert events[-1]["status"] == "failed" and "file" in events[-1]["error"]
    assert leftovers(models_dir(server)) == []


async def test_install_refuses_bad_payloads(
        aiohttp_server: Factory, make_config: Callable[..., Config],
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config)
    client = await open_client(server)
    for payload in (None, "http://x/y.gguf", {"path": 3}, {"path": ""}, {}):
        await client.sio.emit("install_model", payload)
        event = await asyncio.wait_for(client.events.get(), 60)
        assert event["status"] == "failed" and "path" in event["error"]


async def test_install_never_overwrites_an_existing_file(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    folder = models_dir(server)
    folder.mkdir(parents=True)
    (folder / "tiny.gguf").write_bytes(b"GGUF mine")
    client = await open_client(server)
    events = await client.until_done("install_model", files.base + "/tiny.gguf")
    assert events[-1]["status"] == "failed" and "already installed" in events[-1]["error"]
    assert (folder / "tiny.gguf").read_bytes() == b"GGUF mine"
    assert leftovers(folder) == ["tiny.gguf"]
    assert files.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_private_addresses_are_refused_by_default(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory, host: str) -> None:
    server = await lollms_server(aiohttp_server, make_config)
    client = await open_client(server)
    url = files.base.replace("127.0.0.1", host) + "/tiny.gguf"
    events = await client.until_done("install_model", url)
    assert events[-1]["status"] == "failed"
    assert "allow_private_downloads" in events[-1]["error"]
    assert files.requests == []
    assert leftovers(models_dir(server)) == []


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("224.0.0.251", False), ("239.255.255.250", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False),
    ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("not an address", False),
])
def test_public_address_check(address: str, public: bool) -> None:
    assert is_public_address(address) is public


async def test_a_disconnect_cancels_the_download_and_cleans_up(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    await client.sio.emit("install_model", {"path": files.base + "/slow.gguf"})
    assert (await asyncio.wait_for(client.events.get(), 60))["status"] == "progress"
    await asyncio.wait_for(files.slow_started.wait(), 60)
    folder = models_dir(server)
    assert [n for n in leftovers(folder) if n.endswith(".part")]
    await client.close()
    # the server drops the download connection once the client is gone
    await asyncio.wait_for(files.slow_finished.wait(), 60)
    for _ in range(600):
        if not leftovers(folder):
            break
        await asyncio.sleep(0.05)
    assert leftovers(folder) == []


async def test_shutdown_cancels_the_download_and_cleans_up(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    client = await open_client(server)
    await client.sio.emit("install_model", {"path": files.base + "/slow.gguf"})
    await asyncio.wait_for(files.slow_started.wait(), 60)
    folder = models_dir(server)
    assert leftovers(folder)
    closing = asyncio.ensure_future(server.close())
    # the download ends with the shutdown while its client is still connected (the
    # sockets are closed after the downloads stop, so check at once: a loaded machine may
    # reach that next shutdown step while the partial file is being removed)
    await asyncio.wait_for(files.slow_finished.wait(), 60)
    assert client.sio.connected
    for _ in range(600):
        if not leftovers(folder):
            break
        await asyncio.sleep(0.05)
    assert leftovers(folder) == []
    # (a still-connected Socket.IO client holds the server's close until its ping
    # timeout; leaving lets the close finish now)
    await client.close()
    await closing


async def test_one_download_at_a_time_per_file_name(
        aiohttp_server: Factory, make_config: Callable[..., Config], files: FileServer,
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, allow_private_downloads=True)
    first, second = await open_client(server), await open_client(server)
    await first.sio.emit("install_model", {"path": files.base + "/slow.gguf"})
    await asyncio.wait_for(files.slow_started.wait(), 60)
    events = await second.until_done("install_model", files.base + "/slow.gguf?again=1")
    assert events[-1]["status"] == "failed" and "already being" in events[-1]["error"]
    assert files.requests == ["/files/slow.gguf"]
    await first.close()


# ---------------------------------------------------------------- uninstall


async def test_uninstall_deletes_a_model_by_name_or_url(
        aiohttp_server: Factory, make_config: Callable[..., Config],
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config)
    folder = models_dir(server)
    folder.mkdir(parents=True)
    (folder / "one.gguf").write_bytes(b"GGUF")
    (folder / "two.gguf").write_bytes(b"GGUF")
    client = await open_client(server)
    assert await client.until_done("uninstall_model", "one.gguf") == [
        {"status": "succeeded", "progress": 100, "error": ""}]
    events = await client.until_done("uninstall_model",
                                     "https://huggingface.co/a/b/resolve/main/two.gguf")
    assert events[-1]["status"] == "succeeded"
    assert leftovers(folder) == []
    events = await client.until_done("uninstall_model", "one.gguf")
    assert events[-1]["status"] == "failed" and "not installed" in events[-1]["error"]


async def test_uninstall_refuses_the_configured_and_the_running_model(
        aiohttp_server: Factory, make_config: Callable[..., Config],
        open_client: Factory) -> None:
    server = await lollms_server(aiohttp_server, make_config, model="running.gguf")
    folder = models_dir(server)
    folder.mkdir(parents=True)
    (folder / "running.gguf").write_bytes(b"GGUF")
    (folder / "chosen.gguf").write_bytes(b"GGUF")
    client = await open_client(server)
    events = await client.until_done("uninstall_model", "running.gguf")
    assert events[-1]["status"] == "failed" and "current model" in events[-1]["error"]

    # choose another model: without an engine the change is pending, so the old file is
    # still the one the engine was built with, and the new one is the configured one
    await client.sio.emit("update_setting", {"setting_name": "model",
                                             "setting_value": "chosen.gguf"})
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            async with http.get(server.make_url("/get_config")) as resp:
                config = await resp.json()
            if config["model"] == "chosen.gguf":
                break
            await asyncio.sleep(0.05)
    assert config["model"] == "chosen.gguf"
    for name in ("running.gguf", "chosen.gguf"):
        events = await client.until_done("uninstall_model", name)
        assert events[-1]["status"] == "failed" and "current model" in events[-1]["error"]
    assert leftovers(folder) == ["chosen.gguf", "running.gguf"]


async def test_uninstall_refuses_paths_outside_the_models_folder(
        aiohttp_server: Factory, make_config: Callable[..., Config],
        open_client: Factory, tmp_path: Path) -> None:
    server = await lollms_server(aiohttp_server, make_config)
    folder = models_dir(server)
    folder.mkdir(parents=True)
    outside = folder.parent / "outside.gguf"
    outside.write_bytes(b"GGUF")
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(b"GGUF")
    (folder / "link.gguf").symlink_to(elsewhere)
    (folder / "models.yaml").write_text("[]", encoding="utf-8")
    client = await open_client(server)
    for path in ("../outside.gguf", str(outside), "..%2Foutside.gguf",
                 "https://example.org/x/..%2Foutside.gguf", "link.gguf", "models.yaml",
                 "..", ""):
        events = await client.until_done("uninstall_model", path)
        assert events[-1]["status"] == "failed" and events[-1]["error"], path
    assert outside.exists() and elsewhere.exists()
    assert leftovers(folder) == ["link.gguf", "models.yaml"]
