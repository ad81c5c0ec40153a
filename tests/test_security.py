"""The security model (SPEC section 7, docs/security.md): API key handling, secrets kept out of
the config file, TLS, and the start-up warning. Every refused request must also change
nothing."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient

from chatkit import free_port
from lollms_fast.app import build_app
from lollms_fast.cli import is_loopback, read_key_file
from lollms_fast.config import Config, ConfigError, load_config

KEY = "k3y-for-tests"


@pytest.fixture
async def keyed_client(aiohttp_client: Any, make_config: Callable[..., Config]) -> TestClient:
    return await aiohttp_client(build_app(make_config(api_key=KEY), backend_factory=None))


async def discussions(client: TestClient) -> list[dict[str, Any]]:
    resp = await client.get("/list_discussions", headers={"X-API-Key": KEY})
    assert resp.status == 200
    result: list[dict[str, Any]] = await resp.json()
    return result


@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": "wrong"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Basic " + KEY},
    {"X-API-Key": KEY[:-1]},
])
async def test_missing_or_wrong_key_is_401_and_changes_nothing(
        keyed_client: TestClient, headers: dict[str, str]) -> None:
    resp = await keyed_client.get("/new_discussion", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["status"] is False
    assert await discussions(keyed_client) == []


async def test_key_in_the_query_string_is_not_accepted(keyed_client: TestClient) -> None:
    """A key in the URL ends up in logs and browser history: it is never read from there."""
    resp = await keyed_client.get("/new_discussion", params={"api_key": KEY})
    assert resp.status == 401
    assert await discussions(keyed_client) == []


async def test_key_headers_that_work(keyed_client: TestClient) -> None:
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                    {"Authorization": f"bearer {KEY}"}):
        resp = await keyed_client.get("/list_discussions", headers=headers)
        assert resp.status == 200, headers


async def test_malformed_key_header_is_401_not_500(keyed_client: TestClient) -> None:
    """A header value that is not UTF-8 (raw bytes on the wire) is a wrong key."""
    port = keyed_client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /list_discussions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"X-API-Key: \xff\xfe\xe9k3y\r\nConnection: close\r\n\r\n")
    await writer.drain()
    reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"Traceback" not in reply


def test_environment_key_never_reaches_the_config_file(tmp_path: Path) -> None:
    cfg = load_config({"data_dir": str(tmp_path)}, environ={"LOLLMS_API_KEY": "from-env"})
    assert cfg.api_key == "from-env"
    cfg.updated({"temperature": 0.3}).save()
    text = (tmp_path / "local_config.yaml").read_text(encoding="utf-8")
    assert "from-env" not in text and "api_key" not in yaml.safe_load(text)
    flag = load_config({"data_dir": str(tmp_path), "api_key": "from-flag"}, environ={})
    flag.save()
    assert "from-flag" not in (tmp_path / "local_config.yaml").read_text(encoding="utf-8")


def test_a_key_written_in_the_file_stays_there(tmp_path: Path) -> None:
    """The operator's own key in local_config.yaml is used and kept by a save, even when the
    environment overrides it for one run."""
    path = tmp_path / "local_config.yaml"
    path.write_text("api_key: in-file\ntemperature: 0.5\n", encoding="utf-8")
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    assert cfg.api_key == "in-file"
    cfg.save()
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["api_key"] == "in-file"
    env = load_config({"data_dir": str(tmp_path)}, environ={"LOLLMS_API_KEY": "from-env"})
    assert env.api_key == "from-env"
    env.save()
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["api_key"] == "in-file" and "from-env" not in path.read_text()


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("  s3cret-from-file \nsecond line ignored\n", encoding="utf-8")
    assert read_key_file(path) == "s3cret-from-file"
    (tmp_path / "empty").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        read_key_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing")


@pytest.mark.parametrize("host,loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
    ("[::1]", True), ("app.localhost", True), ("0.0.0.0", False), ("::", False),
    ("192.168.1.5", False), ("myhost.example", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lollms_fast", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.mark.slow
def test_tls_serves_with_a_self_signed_certificate(tmp_path: Path,
                                                   default_model_path: Path) -> None:
    """--ssl-certfile/--ssl-keyfile: HTTPS with a certificate made here (trustme); the
    session cookie is Secure; plain HTTP on that port gets no answer."""
    import trustme

    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    port = free_port()
    proc = _serve(["--data-dir", str(tmp_path / "data"), "--model", str(default_model_path),
                   "--host", "127.0.0.1", "--port", str(port), "--parallel", "1",
                   "--ssl-certfile", str(cert_path), "--ssl-keyfile", str(key_path)],
                  _clean_env())
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    async def check() -> None:
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    async with session.get(f"https://127.0.0.1:{port}/get_config",
                                           ssl=client_context) as resp:
                        assert resp.status == 200
                        cookie = resp.headers.get("Set-Cookie", "")
                        assert (await resp.json())["ssl_certfile"] == str(cert_path)
                        break
                except aiohttp.ClientConnectorError:
                    assert time.monotonic() < deadline, "the server did not start"
                    await asyncio.sleep(0.3)
            assert "lollms_session=" in cookie and "Secure" in cookie, cookie
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/get_config") as resp:
                    await resp.read()

    try:
        asyncio.run(check())
    finally:
        _stop(proc)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lollms_fast", "--data-dir", str(tmp_path),
                          "--ssl-certfile", str(tmp_path / "nope.pem")],
                         capture_output=True, text=True, timeout=60, env=_clean_env())
    assert out.returncode == 2 and "ssl" in out.stderr.lower()
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_warning_when_listening_beyond_loopback_without_a_key(
        tmp_path: Path, default_model_path: Path) -> None:
    port = free_port()
    proc = _serve(["--data-dir", str(tmp_path), "--model", str(default_model_path),
                   "--host", "0.0.0.0", "--port", str(port), "--parallel", "1"], _clean_env())
    try:
        deadline = time.monotonic() + 60
        seen = ""
        assert proc.stderr is not None
        while time.monotonic() < deadline and "serving on" not in seen:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
    finally:
        seen += _stop(proc)
    assert "without an API key" in seen
