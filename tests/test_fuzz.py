"""`/openapi.json` (SPEC section 8) kept true: it is valid OpenAPI 3.1, it lists exactly the
routes the server registers, and schemathesis fuzzes every route of it against a real server
(a real aiohttp server on an ephemeral port, a real SQLite file) checking that no answer is a
5xx, a hang, or outside the document (status, content type, headers, body schema), and that
input the document forbids is refused.

The fuzzing runs the schemathesis command line (examples, coverage, fuzzing and stateful
phases; the stateful phase follows the document's links: /new_discussion -> /load_discussion
-> the message routes). See docs/testing.md for the longer run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

import lollms_fast
from fakes import ScriptedBackend
from lollms_fast.app import EngineLoader, build_app
from lollms_fast.config import SETTINGS, Config, load_config
from lollms_fast.engine import Engine
from lollms_fast.server.routes_ops import openapi_document
from lollms_fast.services.settings import UPDATABLE

DOCUMENT: dict[str, Any] = json.loads(openapi_document())
HTTP_METHODS = ("get", "put", "post", "delete", "options", "patch", "trace")
# the static catch-all answers every method but GET/HEAD with 404 (no such route) or 405
CATCH_ALL_METHODS = frozenset({"post", "put", "patch", "delete", "options", "trace"})

# Bounded for CI (two shared cores); LOLLMS_FUZZ_EXAMPLES / LOLLMS_FUZZ_SEED for longer or
# other runs (docs/testing.md).
FUZZ_EXAMPLES = int(os.environ.get("LOLLMS_FUZZ_EXAMPLES", "40"))
FUZZ_SEED = os.environ.get("LOLLMS_FUZZ_SEED", "20231")
# a request unanswered this long is a hang (the slowest route answers in milliseconds)
REQUEST_TIMEOUT_S = 30
# a whole run (about half a second per example and operation on two shared cores)
RUN_TIMEOUT_S = 300 + 3 * FUZZ_EXAMPLES
# Every check but: positive_data_acceptance (schema-valid input may still be refused with a
# documented 400: an id sent as 1.0 is a JSON-Schema integer but not an id, a setting value
# outside its range), ignored_auth / object_level_authorization (the fuzzed servers have no
# key; test_api_key_sweep covers 401s).
EXCLUDED_CHECKS = "positive_data_acceptance,ignored_auth,object_level_authorization"


def fuzz_config(data_dir: Path, **overrides: Any) -> Config:
    flags: dict[str, Any] = {"data_dir": str(data_dir), "host": "127.0.0.1", "port": 0,
                             "n_threads": 1, "parallel": 2, "ctx_size": 256}
    flags.update(overrides)
    return load_config(flags, environ={})


def scripted_engine(config: Config) -> Engine:
    """A scripted engine (protocol test): /health is 200 and reloads are exercised, at no
    cost in model loading."""
    engine = Engine(ScriptedBackend([b"ok"]), parallel=config.parallel,
                    n_ctx_slot=config.ctx_size, n_batch=config.n_batch,
                    queue_size=config.queue_size)
    engine.start()
    return engine


class ServerThread:
    """The app on 127.0.0.1:<ephemeral>, served by its own event loop in a thread, so that a
    plain (synchronous) client in another process can talk to it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzzed-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._started.wait(60):
            raise RuntimeError("the server did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """serve(backend_factory, **config) -> base URL of a running server."""
    servers: list[ServerThread] = []

    def start(backend_factory: EngineLoader | None, **overrides: Any) -> str:
        data_dir = tmp_path / f"data{len(servers)}"
        server = ServerThread(build_app(fuzz_config(data_dir, **overrides),
                                        backend_factory=backend_factory))
        servers.append(server)
        return server.__enter__()

    yield start
    for server in reversed(servers):
        server.__exit__()


def documented_operations() -> set[tuple[str, str]]:
    return {(method, path) for path, item in DOCUMENT["paths"].items()
            for method in item if method in HTTP_METHODS}


def response_validator(path: str, method: str, status: int,
                       media: str = "application/json") -> Draft202012Validator:
    """The document's schema for one response, its `$ref`s resolved in the document."""
    response = DOCUMENT["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"][media]["schema"]
    return Draft202012Validator({**schema, "components": DOCUMENT["components"]})


# ---------------------------------------------------------------- the document itself


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    assert DOCUMENT["info"]["version"] == lollms_fast.__version__
    OpenAPIV31SpecValidator(DOCUMENT).validate()


def test_document_lists_exactly_the_registered_routes(tmp_path: Path) -> None:
    """Every route of the app is in the document with its methods, and nothing else: a new
    route cannot be served undocumented. HEAD (added by aiohttp for every GET) is implied by
    GET; /socket.io/ is the Socket.IO protocol, described by SPEC section 4."""
    app = build_app(fuzz_config(tmp_path), backend_factory=None)
    registered: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path == "/socket.io/":
            continue
        if route.method == "*":
            registered |= {(m, path) for m in CATCH_ALL_METHODS}
        else:
            registered.add((route.method.lower(), path))
    assert registered == documented_operations()


def test_config_schema_lists_every_setting() -> None:
    """/get_config's schema names every setting with its type (docs/configuration.md's
    table is checked the same way)."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    properties = DOCUMENT["components"]["schemas"]["Config"]["properties"]
    assert {name: p["type"] for name, p in properties.items()} == {
        s.name: kinds[s.type] for s in SETTINGS}


def test_updatable_settings_are_the_documented_names() -> None:
    body = DOCUMENT["paths"]["/update_setting"]["post"]["requestBody"]
    names = body["content"]["application/json"]["schema"]["properties"]["setting_name"]
    assert set(names["enum"]) == UPDATABLE


async def test_served_document_is_the_packaged_file(rest_client: Any) -> None:
    resp = await rest_client.get("/openapi.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await resp.read() == openapi_document()


# ---------------------------------------------------------------- answers the fuzzer skips


async def test_health_without_engine_matches_the_document(rest_client: Any) -> None:
    """The no-engine fuzz run leaves /health out (its 503 is by design there)."""
    resp = await rest_client.get("/health")
    assert resp.status == 503
    response_validator("/health", "get", 503).validate(await resp.json())


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"})])
async def test_completions_without_engine_match_the_document(rest_client: Any, path: str,
                                                             body: dict[str, Any]) -> None:
    """The no-engine fuzz run leaves the completion routes out: without a model every body
    is answered 503 (OpenAI's error shape), checked here."""
    resp = await rest_client.post(path, json=body)
    assert resp.status == 503
    response_validator(path, "post", 503).validate(await resp.json())


@pytest.mark.parametrize("key", ["", "wrong"])
async def test_api_key_sweep(aiohttp_client: Any, make_config: Callable[..., Config],
                             key: str) -> None:
    """With a key configured, every documented operation called without it (or with a wrong
    one) answers 401 in the error shape, except the public ones (`security: []`), which
    answer one of their documented statuses."""
    client = await aiohttp_client(build_app(make_config(api_key="k"), backend_factory=None))
    headers = {"X-API-Key": key} if key else {}
    for method, path in sorted(documented_operations()):
        operation = DOCUMENT["paths"][path][method]
        url = path.replace("{path}", "english/general/lollms/assets/logo.png") \
                  .replace("{filename}", "app.js")
        resp = await client.request(method.upper(), url, headers=headers, json={})
        public = operation.get("security") == []
        assert str(resp.status) in operation["responses"], (method, path, resp.status)
        if not public:
            assert resp.status == 401, (method, path)
            response_validator(path, method, 401).validate(await resp.json())


# ---------------------------------------------------------------- bugs found by the fuzzer


async def test_unknown_path_is_404_for_every_method(rest_client: Any) -> None:
    """The GET-only static catch-all made every other method on an unknown path a 405; a
    path that is a route keeps its 405 with the methods it takes."""
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"):
        resp = await rest_client.request(method, "/no/such/route")
        assert resp.status == 404, method
        assert await resp.json() == {"status": False, "error": "no such route"}
    for path, allow in (("/list_discussions", {"GET", "HEAD"}),
                        ("/load_discussion", {"POST"}),
                        ("/personalities/english/x", {"GET", "HEAD"}),
                        ("/main", {"GET", "HEAD"})):
        resp = await rest_client.put(path)
        assert resp.status == 405, path
        assert set(resp.headers["Allow"].split(",")) == allow
        assert (await resp.json())["status"] is False


async def test_get_on_a_v1_route_without_get_is_405(rest_client: Any) -> None:
    """GET /v1/chat/completions was the static catch-all's 404 "file not found" (the fuzzer's
    undeclared-method check wants 405); an unknown /v1/ path is a 404, both in OpenAI's
    shape."""
    for path in ("/v1/chat/completions", "/v1/completions"):
        resp = await rest_client.get(path)
        assert resp.status == 405, path
        assert set(resp.headers["Allow"].split(",")) == {"POST", "OPTIONS"}
        response_validator("/v1/{tail}", "get", 405).validate(await resp.json())
    resp = await rest_client.get("/v1/no/such/route")
    assert resp.status == 404
    response_validator("/v1/{tail}", "get", 404).validate(await resp.json())


# ---------------------------------------------------------------- fuzzing


def run_schemathesis(base_url: str, *extra: str) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--mode", "all", "--max-examples", str(FUZZ_EXAMPLES), "--seed", FUZZ_SEED,
        "--request-timeout", str(REQUEST_TIMEOUT_S), "--workers", "2",
        "--suppress-health-check", "all", *extra,
    ]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_HOOKS="", COLUMNS="120")
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    summary = done.stdout.rfind(" SUMMARY ")
    print(done.stdout[summary:] if summary >= 0 else done.stdout[-3000:])  # shown with -s


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_fuzz_every_route_without_engine(serve: Callable[..., str]) -> None:
    """As the REST tests run: no model engine (engine-level settings stay pending). /health
    and the OpenAI completion routes are left out: without an engine their 503 is the
    designed answer (checked above)."""
    run_schemathesis(serve(None), "--exclude-path", "/health",
                     "--exclude-path", "/v1/chat/completions",
                     "--exclude-path", "/v1/completions")


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_fuzz_every_route_with_scripted_engine(serve: Callable[..., str]) -> None:
    """With an engine (scripted: the fuzzer reloads it on every ctx_size / model change), so
    /health is 200 and the reload paths of the settings routes answer."""
    run_schemathesis(serve(scripted_engine))
