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


# ---------------------------------------------------------------- DNS rebinding and CSRF


@pytest.fixture
async def open_client(aiohttp_client: Any, make_config: Callable[..., Config]) -> TestClient:
    """A server with no key, on loopback: the default that pages must not be able to abuse."""
    return await aiohttp_client(build_app(make_config(), backend_factory=None))


async def new_discussion(client: TestClient) -> int:
    resp = await client.get("/new_discussion", params={"title": "mine"})
    assert resp.status == 200
    return int((await resp.json())["id"])


async def state(client: TestClient) -> tuple[Any, ...]:
    """Everything a refused request could have changed."""
    listing = await (await client.get("/list_discussions")).json()
    config = await (await client.get("/get_config")).json()
    messages = []
    for d in listing:
        resp = await client.post("/load_discussion", json={"id": d["id"]})
        messages.append(await resp.json())
    return listing, config, messages


REBINDING_HOSTS = ["attacker.example:9600", "attacker.example", "attacker.example.",
                   "attacker.example:1234", "[2001:db8::1]:9600", "10.0.0.7:9600",
                   "localhost.attacker.example", "127.0.0.1.nip.io:9600", "local host",
                   "[::1", "localhost:abc"]


@pytest.mark.parametrize("host", REBINDING_HOSTS)
async def test_dns_rebinding_hosts_are_403(open_client: TestClient, host: str) -> None:
    await new_discussion(open_client)
    before = await state(open_client)
    for method, path, body in (("GET", "/export", None), ("GET", "/list_discussions", None),
                               ("POST", "/delete_discussion", {"id": 1}),
                               ("GET", "/socket.io/?EIO=4&transport=polling", None)):
        resp = await open_client.request(method, path, json=body, headers={"Host": host})
        assert resp.status == 403, (host, path, resp.status)
        assert "discussion" not in await resp.text()
    assert await state(open_client) == before


@pytest.mark.parametrize("host", ["localhost:9600", "localhost", "LOCALHOST.:9600",
                                  "127.0.0.1:9600", "127.5.5.5", "[::1]:9600", "[::1]",
                                  "chat.localhost:9600"])
async def test_own_names_are_served(open_client: TestClient, host: str) -> None:
    resp = await open_client.get("/list_discussions", headers={"Host": host})
    assert resp.status == 200, host


async def test_the_machine_name_and_allowed_hosts_are_served(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    import socket

    client = await aiohttp_client(build_app(
        make_config(allowed_hosts="chat.example.org, 192.168.1.20"), backend_factory=None))
    for host in (socket.gethostname(), "chat.example.org:443", "192.168.1.20:9600"):
        assert (await client.get("/list_discussions", headers={"Host": host})).status == 200
    assert (await client.get("/list_discussions",
                             headers={"Host": "other.example.org"})).status == 403
    anyone = await aiohttp_client(build_app(make_config(allowed_hosts="*"),
                                            backend_factory=None))
    assert (await anyone.get("/list_discussions",
                             headers={"Host": "attacker.example"})).status == 200


async def test_socketio_handshake_from_a_rebound_host_is_refused(
        open_client: TestClient) -> None:
    """CVE-2024-1511's class: Host and Origin both the attacker's name."""
    evil = "attacker.example:9600"
    resp = await open_client.get("/socket.io/?EIO=4&transport=polling",
                                 headers={"Host": evil, "Origin": f"http://{evil}"})
    assert resp.status == 403
    # and a cross-origin handshake on a good Host is refused by the Socket.IO origin check
    resp = await open_client.get("/socket.io/?EIO=4&transport=polling",
                                 headers={"Origin": "http://evil.example"})
    assert resp.status == 400
    ok = await open_client.get("/socket.io/?EIO=4&transport=polling")
    assert ok.status == 200


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "http://localhost:8080"},  # another local service is another origin
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
]


@pytest.mark.parametrize("headers", CROSS_SITE)
async def test_csrf_on_post_routes_is_403_and_changes_nothing(
        open_client: TestClient, headers: dict[str, str]) -> None:
    discussion = await new_discussion(open_client)
    before = await state(open_client)
    for path, body in (("/delete_discussion", {"id": discussion}),
                       ("/edit_title", {"id": discussion, "title": "pwned"}),
                       ("/update_setting", {"setting_name": "temperature",
                                            "setting_value": 0.1}),
                       ("/import_multiple_discussions", {"jArray": [{"title": "x"}]}),
                       ("/reset_settings", None), ("/save_settings", None)):
        resp = await open_client.post(path, json=body, headers=headers)
        assert resp.status == 403, (path, headers, resp.status)
    assert await state(open_client) == before
    assert not (config_path(open_client)).exists()


def config_path(client: TestClient) -> Path:
    from lollms_fast.server.keys import SETTINGS

    return client.server.app[SETTINGS].config.config_path


@pytest.mark.parametrize("headers", CROSS_SITE)
async def test_csrf_on_state_changing_get_routes_is_403(
        open_client: TestClient, headers: dict[str, str]) -> None:
    """The 2023 API changes state with GETs, which an <img> tag can send."""
    discussion = await new_discussion(open_client)
    messages = await (await open_client.post("/load_discussion",
                                             json={"id": discussion})).json()
    message = messages[0]["id"]
    before = await state(open_client)
    for path, params in (("/new_discussion", {"title": "x"}),
                         ("/delete_message", {"id": message}),
                         ("/update_message", {"id": message, "message": "pwned"}),
                         ("/message_rank_up", {"id": message}),
                         ("/message_rank_down", {"id": message}),
                         ("/set_personality_language", {"language": "french"}),
                         ("/set_personality_category", {"category": "general"}),
                         ("/stop_gen", {})):
        resp = await open_client.get(path, params=params, headers=headers)
        assert resp.status == 403, (path, headers, resp.status)
    assert await state(open_client) == before


async def test_form_and_text_bodies_are_415_and_change_nothing(
        open_client: TestClient) -> None:
    """What a plain HTML form or a no-preflight fetch can send; no Origin needed to refuse."""
    discussion = await new_discussion(open_client)
    before = await state(open_client)
    raw = f'{{"id": {discussion}}}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", ""):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await open_client.post("/delete_discussion", data=raw.encode(),
                                      headers=headers)
        assert resp.status == 415, (content_type, resp.status)
    assert await state(open_client) == before


async def test_same_origin_scripts_and_listed_origins_pass(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    client = await aiohttp_client(build_app(make_config(allowed_origins="https://ui.example"),
                                            backend_factory=None))
    own = f"http://{client.host}:{client.port}"
    for headers in ({}, {"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"},
                    {"Origin": "https://ui.example"}, {"Sec-Fetch-Site": "none"}):
        resp = await client.get("/new_discussion", headers=headers)
        assert resp.status == 200, headers
        resp = await client.post("/edit_title", json={"id": 1, "title": "ok"},
                                 headers=headers)
        assert resp.status == 200, headers


async def test_behind_a_tls_proxy_the_https_origin_is_our_own(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    """nginx terminates TLS and says so with X-Forwarded-Proto: the browser's https origin
    is this server's own (no allowed_origins needed) and the session cookie is Secure.
    Without the header the https origin is another origin, and refused."""
    client = await aiohttp_client(build_app(make_config(), backend_factory=None))
    https_own = f"https://{client.host}:{client.port}"
    proxied = {"Origin": https_own, "X-Forwarded-Proto": "https"}
    resp = await client.post("/edit_title", json={"id": 1, "title": "x"}, headers=proxied)
    assert resp.status == 404, await resp.text()  # past the origin check: no discussion 1
    resp = await client.post("/edit_title", json={"id": 1, "title": "x"},
                             headers={"Origin": https_own})
    assert resp.status == 403
    resp = await client.post("/edit_title", json={"id": 1, "title": "x"}, headers={
        "Origin": "https://elsewhere.example", "X-Forwarded-Proto": "https"})
    assert resp.status == 403  # the header adds our own https origin, nobody else's
    client.session.cookie_jar.clear()
    secure = await client.get("/list_discussions", headers={"X-Forwarded-Proto": "https"})
    plain = await client.get("/list_discussions")
    assert "Secure" in secure.headers["Set-Cookie"]
    assert "Secure" not in plain.headers["Set-Cookie"]


async def test_security_headers(open_client: TestClient) -> None:
    api = await open_client.get("/list_discussions")
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert api.headers["Referrer-Policy"] == "no-referrer"
    page = await open_client.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "Content-Security-Policy" not in api.headers


# ---------------------------------------------------------------- size limits


def _export(n_discussions: int, n_messages: int, content: str = "hi") -> dict[str, Any]:
    return {"jArray": [{"title": f"d{i}", "messages": [
        {"sender": "user", "content": content, "type": 0, "rank": 0}
        for _ in range(n_messages)]} for i in range(n_discussions)]}


async def test_imports_have_their_own_size_limit_and_a_count_cap(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    client = await aiohttp_client(build_app(make_config(
        max_body_size=4096, max_import_size=256 * 1024, max_import_messages=100),
        backend_factory=None))
    # larger than max_body_size, within max_import_size: accepted
    resp = await client.post("/import_multiple_discussions", json=_export(2, 40, "x" * 100))
    assert resp.status == 200, await resp.text()
    before = await state(client)
    for body, why in ((_export(1, 10, "y" * 30_000), "bytes"),
                      (_export(101, 0), "discussions"), (_export(3, 40), "messages")):
        resp = await client.post("/import_multiple_discussions", json=body)
        assert resp.status == 413, (why, resp.status)
        assert (await resp.json())["status"] is False
    assert await state(client) == before
    # other routes keep max_body_size
    resp = await client.post("/edit_title", json={"id": 1, "title": "t" * 5000})
    assert resp.status == 413


async def test_an_import_without_content_length_is_cut_at_the_limit(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    import orjson

    client = await aiohttp_client(build_app(make_config(max_import_size=64 * 1024),
                                            backend_factory=None))
    payload = orjson.dumps(_export(1, 1, "z" * 200_000))

    async def chunked() -> Any:
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]

    resp = await client.post("/import_multiple_discussions", data=chunked(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert await (await client.get("/list_discussions")).json() == []


async def test_a_prompt_over_max_prompt_chars_is_refused_before_tokenizing(
        aiohttp_server: Any, make_config: Callable[..., Config]) -> None:
    from chatkit import Browser
    from fakes import ScriptedBackend
    from lollms_fast.engine import Engine

    tokenized: list[int] = []

    class Watching(ScriptedBackend):
        def tokenize(self, text: str, add_special: bool = True,
                     parse_special: bool = False) -> list[int]:
            tokenized.append(len(text))
            return super().tokenize(text, add_special, parse_special)

    def loader(config: Config) -> Engine:
        engine = Engine(Watching([b"ok"]), parallel=1, n_ctx_slot=config.ctx_size,
                        n_batch=config.n_batch, queue_size=config.queue_size)
        engine.start()
        return engine

    server = await aiohttp_server(build_app(make_config(max_prompt_chars=1000, ctx_size=4096),
                                            backend_factory=loader))
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        _, created = await b.get("/new_discussion", title="limits")
        before = await b.messages(created["id"])
        final = await b.generate("w" * 1001)
        assert final["finish_reason"] == "error"
        infos = [d for n, d in b.events if n == "infos"]
        assert "max_prompt_chars" in infos[-1]["message"]
        assert await b.messages(created["id"]) == before
        assert all(n <= 1000 for n in tokenized)
        assert (await b.generate("w" * 1000))["finish_reason"] == "stop"
    finally:
        await b.close()


async def test_head_never_runs_a_state_changing_route(open_client: TestClient) -> None:
    """aiohttp answers HEAD with the GET handler unless told not to."""
    before = await state(open_client)
    resp = await open_client.head("/new_discussion", params={"title": "x"})
    assert resp.status in (404, 405)
    assert await state(open_client) == before
