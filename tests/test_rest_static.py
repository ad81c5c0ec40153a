"""Pages, static files and personality assets: served from their roots and nowhere else.

Traversal attempts are sent as raw request lines over a socket, because HTTP clients
normalise `..` away before sending."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.server.keys import SETTINGS
from lollms_fast.server.routes_static import BUILTIN_UI

PAGES = ["/", "/main", "/settings", "/help", "/training", "/extensions", "/settings/",
         "/help/"]


async def raw_get(client: TestClient, raw_path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET with the request target exactly as given."""
    assert client.host is not None and client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode("latin-1"))
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.fixture
def ui_tree(tmp_path: Path) -> Path:
    """A UI root with a secret file beside it (what an escape would reach)."""
    (tmp_path / "secret.txt").write_text("TOP SECRET", encoding="utf-8")
    ui = tmp_path / "ui"
    (ui / "sub").mkdir(parents=True)
    (ui / "index.html").write_text("<!doctype html><title>custom ui</title>", encoding="utf-8")
    (ui / "app.js").write_text("console.log('é')", encoding="utf-8")
    (ui / "sub" / "style.css").write_text("body{}", encoding="utf-8")
    (ui / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (ui / ".env").write_text("SECRET=1", encoding="utf-8")
    os.symlink(tmp_path / "secret.txt", ui / "escape.txt")
    os.symlink(tmp_path, ui / "escape_dir")
    os.symlink(ui / "app.js", ui / "alias.js")
    return ui


@pytest.fixture
async def ui_client(aiohttp_client: Any, make_config: Callable[..., Config],
                    ui_tree: Path) -> TestClient:
    return await aiohttp_client(build_app(make_config(ui_dir=str(ui_tree)),
                                          backend_factory=None))


@pytest.mark.parametrize("page", PAGES)
async def test_pages_serve_the_builtin_entry_page(rest_client: TestClient, page: str) -> None:
    resp = await rest_client.get(page)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert await resp.read() == (BUILTIN_UI / "index.html").read_bytes()


async def test_ui_dir_overrides_the_root(ui_client: TestClient) -> None:
    page = await ui_client.get("/settings")
    assert "custom ui" in await page.text()
    js = await ui_client.get("/app.js")
    assert js.status == 200 and await js.text() == "console.log('é')"
    assert js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert js.headers["Cache-Control"] == "public, max-age=3600"
    assert js.headers["X-Content-Type-Options"] == "nosniff"
    assert "ETag" in js.headers and "Last-Modified" in js.headers
    css = await ui_client.get("/sub/style.css")
    assert css.headers["Content-Type"] == "text/css; charset=utf-8"
    png = await ui_client.get("/logo.png")
    assert png.headers["Content-Type"] == "image/png"
    head = await ui_client.head("/app.js")
    assert head.status == 200 and head.headers["Content-Length"] == str(
        len("console.log('é')".encode()))
    again = await ui_client.get("/app.js", headers={"If-None-Match": js.headers["ETag"]})
    assert again.status == 304
    # a symlink that stays inside the root is fine
    assert (await ui_client.get("/alias.js")).status == 200


ESCAPES = [
    "/../secret.txt", "/../../../../etc/passwd", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt",
    "/..%2fsecret.txt", "/..%2Fsecret.txt", "/%2e%2e%2fsecret.txt", "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt", "//etc/passwd", "/%2fetc%2fpasswd", "/..%5csecret.txt",
    "/escape.txt", "/escape_dir/secret.txt", "/.env", "/sub/", "/sub", "/%00", "/app.js%00",
    "/nothing-here.js", "/C:%5cWindows", "/personalities/../secret.txt",
    "/personalities/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "/personalities/english/general/lollms/config.yaml",
    "/personalities/english/general/lollms/assets/../config.yaml",
    "/personalities/english/general/lollms/assets/%2e%2e/config.yaml",
    "/personalities/english/general/lollms/assets/..%2fconfig.yaml",
    "/personalities/english/general/lollms/assets/", "/personalities/english",
]


@pytest.mark.parametrize("raw_path", ESCAPES)
async def test_escapes_and_misses_are_404(ui_client: TestClient, raw_path: str) -> None:
    status, headers, body = await raw_get(ui_client, raw_path)
    assert status == 404, (status, body)
    assert b"TOP SECRET" not in body and b"root:" not in body and b"name:" not in body
    if status == 404:
        assert headers["content-type"] == "application/json; charset=utf-8"


async def test_catch_all_does_not_shadow_socketio_or_api(rest_client: TestClient) -> None:
    resp = await rest_client.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
    assert resp.status == 200 and (await resp.text()).startswith("0{")
    listed = await rest_client.get("/list_discussions")
    assert listed.headers["Content-Type"] == "application/json; charset=utf-8"
    post_only = await rest_client.get("/load_discussion")
    assert post_only.status in (404, 405)  # never a file, never a 500


async def test_user_personality_assets_win(rest_client: TestClient) -> None:
    root = rest_client.server.app[SETTINGS].config.personalities_dir
    assets = root / "english" / "general" / "lollms" / "assets"
    assets.mkdir(parents=True)
    (assets / "logo.png").write_bytes(b"user logo")
    (root / "english" / "general" / "lollms" / "config.yaml").write_text(
        "name: lollms\n", encoding="utf-8")
    resp = await rest_client.get("/personalities/english/general/lollms/assets/logo.png")
    assert resp.status == 200 and await resp.read() == b"user logo"
