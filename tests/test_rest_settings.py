"""Settings routes (SPEC 3) on a real server. Reload logic is checked with a recording
stand-in for the engine loader (the test is about when reloads happen, not about the model)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.errors import ModelLoadError
from lollms_fast.server.keys import ENGINE_CONTROL, SETTINGS


async def post_json(client: TestClient, path: str, body: Any, status: int = 200) -> Any:
    resp = await client.post(path, json=body)
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    return await resp.json()


async def update(client: TestClient, name: str, value: Any, status: int = 200) -> Any:
    return await post_json(client, "/update_setting",
                           {"setting_name": name, "setting_value": value}, status)


def config_of(client: TestClient) -> Config:
    return client.server.app[SETTINGS].config


class RecordingLoader:
    """Stands in for the engine loader: records each load, fails when told to."""

    def __init__(self) -> None:
        self.loaded: list[Config] = []
        self.closed = 0
        self.fail = False

    def __call__(self, config: Config) -> RecordingLoader:
        if self.fail:
            raise ModelLoadError("model file not found: nowhere.gguf")
        self.loaded.append(config)
        return self

    def stats(self) -> dict[str, int]:  # what close_engine polls while it drains
        return {"slots_busy": 0, "queued": 0}

    def close(self) -> None:
        self.closed += 1


async def closed_count(loader: RecordingLoader, expected: int) -> int:
    """Replaced engines are closed in the background: wait (bounded) for `expected`."""
    for _ in range(500):
        if loader.closed >= expected:
            break
        await asyncio.sleep(0.01)
    return loader.closed


@pytest.fixture
async def reload_client(aiohttp_client: Any, make_config: Callable[..., Config]
                        ) -> tuple[TestClient, RecordingLoader]:
    loader = RecordingLoader()
    client = await aiohttp_client(build_app(make_config(), backend_factory=loader))
    return client, loader


@pytest.mark.parametrize("name,value,expected", [
    ("temperature", "0.5", 0.5), ("temperature", 1, 1.0), ("top_k", "12", 12),
    ("top_p", 0.5, 0.5), ("n_predict", 64, 64), ("repeat_penalty", 1.0, 1.0),
    ("repeat_last_n", 0, 0), ("seed", -1, -1), ("seed", "42", 42), ("language", "fr-FR", "fr-FR"),
    ("override_personality_model_parameters", "false", False),
    ("override_personality_model_parameters", "0", False),
    ("override_personality_model_parameters", "true", True),
    ("nb_messages_to_remember", 3, 3), ("n_threads", 1, 1), ("ctx_size", 512, 512),
    ("binding", "llama_cpp", "llama_cpp"),
])
async def test_update_setting_accepts(rest_client: TestClient, name: str, value: Any,
                                      expected: Any) -> None:
    reply = await update(rest_client, name, value)
    assert reply == {"setting_name": name, "status": True}
    assert getattr(config_of(rest_client), name) == expected


@pytest.mark.parametrize("name,value", [
    ("temperature", "hot"), ("temperature", -1), ("temperature", "nan"), ("temperature", "inf"),
    ("temperature", None), ("top_k", 1.5), ("top_k", True), ("top_p", 2),
    ("n_predict", 0), ("n_threads", 0), ("ctx_size", 1), ("seed", -2),
    ("repeat_last_n", "many"), ("language", "../../etc"), ("language", ["en"]),
    ("override_personality_model_parameters", "maybe"), ("binding", "gpt_4all"),
    ("personality", "nobody"), ("personality_language", "klingon"),
    ("personality_category", "nope"), ("model", "../../../etc/passwd"),
    ("model", "/etc/passwd"), ("model", "missing.gguf"),
    ("api_key", "x"), ("data_dir", "/tmp"), ("port", 1), ("no_such_setting", 1),
])
async def test_update_setting_refuses_and_changes_nothing(rest_client: TestClient, name: str,
                                                          value: Any) -> None:
    before = config_of(rest_client)
    resp = await rest_client.post("/update_setting",
                                  json={"setting_name": name, "setting_value": value})
    assert 400 <= resp.status < 500
    reply = await resp.json()
    assert reply["setting_name"] == name and reply["status"] is False and reply["error"]
    assert config_of(rest_client) == before


@pytest.mark.parametrize("body", [{}, {"setting_name": "top_k"}, {"setting_value": 3},
                                  {"setting_name": 5, "setting_value": 3}])
async def test_update_setting_missing_fields(rest_client: TestClient, body: Any) -> None:
    before = config_of(rest_client)
    reply = await post_json(rest_client, "/update_setting", body, 400)
    assert reply["status"] is False
    assert config_of(rest_client) == before


@pytest.mark.parametrize("route", ["/update_setting", "/set_binding", "/set_model",
                                   "/update_model_params"])
@pytest.mark.parametrize("raw", [b"{bad", b"", b"[]", b"\"text\""])
async def test_settings_routes_unparsable_json(rest_client: TestClient, route: str,
                                               raw: bytes) -> None:
    before = config_of(rest_client)
    resp = await rest_client.post(route, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["status"] is False
    assert config_of(rest_client) == before


async def test_settings_routes_oversize_body(rest_client: TestClient) -> None:
    from conftest import REST_BODY_LIMIT

    before = config_of(rest_client)
    big = {"setting_name": "language", "setting_value": "x" * REST_BODY_LIMIT}
    resp = await rest_client.post("/update_setting", json=big)
    assert resp.status == 413 and (await resp.json())["status"] is False
    assert config_of(rest_client) == before


async def test_personality_choice_keeps_the_three_keys_consistent(rest_client: TestClient
                                                                  ) -> None:
    reply = await update(rest_client, "personality_language", "french")
    assert reply["status"] is True
    c = config_of(rest_client)
    assert (c.personality_language, c.personality_category, c.personality) == (
        "french", "general", "assistant")
    current = (await (await rest_client.get("/get_current_personality")).json())["personality"]
    assert current["language"].startswith("fr")
    await update(rest_client, "personality_language", "english")
    await update(rest_client, "personality_category", "coding")
    assert config_of(rest_client).personality == "code_helper"
    assert (await update(rest_client, "personality", "code_helper"))["status"] is True


async def test_set_personality_language_and_category(rest_client: TestClient) -> None:
    resp = await rest_client.get("/set_personality_language", params={"language": "french"})
    assert resp.status == 200 and (await resp.json())["status"] is True
    assert config_of(rest_client).personality_language == "french"
    bad = await rest_client.get("/set_personality_category", params={"category": "coding"})
    assert bad.status == 404  # no such category in french
    assert config_of(rest_client).personality_category == "general"
    resp = await rest_client.get("/set_personality_language", params={"language": "english"})
    resp = await rest_client.get("/set_personality_category", params={"category": "creativity"})
    assert resp.status == 200
    assert config_of(rest_client).personality == "storyteller"
    assert (await rest_client.get("/set_personality_language")).status == 400
    assert (await rest_client.get("/set_personality_language",
                                  params={"language": "../english"})).status == 404


async def test_save_settings_writes_the_file_atomically(rest_client: TestClient) -> None:
    await update(rest_client, "temperature", 0.33)
    path = config_of(rest_client).config_path
    assert not path.exists()  # update_setting changes memory only
    reply = await post_json(rest_client, "/save_settings", None)
    assert reply == {"status": True}
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["temperature"] == 0.33 and "data_dir" not in saved
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


async def test_save_settings_keeps_unknown_keys(aiohttp_client: Any,
                                                make_config: Callable[..., Config],
                                                tmp_path: Path) -> None:
    config_file = tmp_path / "data" / "local_config.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("my_custom_key: 7\ntop_k: 5\n", encoding="utf-8")
    client = await aiohttp_client(build_app(make_config(), backend_factory=None))
    assert config_of(client).top_k == 5
    await post_json(client, "/save_settings", None)
    saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    assert saved["my_custom_key"] == 7 and saved["top_k"] == 5


async def test_update_model_params_applies_and_saves(rest_client: TestClient) -> None:
    body = {"binding": "llama_cpp", "personality_language": "english",
            "personality_category": "general", "personality": "lollms", "nPredict": 77,
            "seed": 5, "voice": "alloy", "language": "de-DE", "temperature": 0.2, "topK": 9,
            "topP": 0.5, "repeatPenalty": 1.05, "repeatLastN": 16}
    reply = await post_json(rest_client, "/update_model_params", body)
    assert reply == {"status": "succeeded"}
    c = config_of(rest_client)
    assert (c.n_predict, c.seed, c.voice, c.language, c.top_k, c.top_p, c.repeat_last_n) == (
        77, 5, "alloy", "de-DE", 9, 0.5, 16)
    assert yaml.safe_load(c.config_path.read_text(encoding="utf-8"))["n_predict"] == 77


@pytest.mark.parametrize("body", [{}, {"unknown": 1}, {"nPredict": "lots"},
                                  {"topK": 5, "topP": 7}, {"personality": "nobody"}])
async def test_update_model_params_refuses_as_a_whole(rest_client: TestClient,
                                                      body: dict[str, Any]) -> None:
    before = config_of(rest_client)
    resp = await rest_client.post("/update_model_params", json=body)
    assert 400 <= resp.status < 500 and (await resp.json())["status"] is False
    assert config_of(rest_client) == before
    assert not before.config_path.exists()


async def test_set_binding_and_model_validation(rest_client: TestClient) -> None:
    assert await post_json(rest_client, "/set_binding", {"binding": "llama_cpp"}) == {
        "status": "succeeded"}
    await post_json(rest_client, "/set_binding", {"binding": "gpt_4all"}, 400)
    await post_json(rest_client, "/set_binding", {}, 400)
    await post_json(rest_client, "/set_model", {"model": 3}, 400)
    await post_json(rest_client, "/set_model", {"model": "nothere.gguf"}, 404)
    models = config_of(rest_client).models_dir
    models.mkdir(parents=True)
    (models / "legacy.bin").write_bytes(b"ggml")
    err = await post_json(rest_client, "/set_model", {"model": "legacy.bin"}, 400)
    assert "GGUF" in err["error"]


async def test_apply_settings_without_engine(rest_client: TestClient) -> None:
    assert await post_json(rest_client, "/apply_settings", None) == {
        "status": "succeeded", "binding_status": True, "model_status": True,
        "personality_status": True, "errors": []}  # the 2023 settings page's shape
    await update(rest_client, "ctx_size", 512)  # pending: there is no engine to reload
    reply = await post_json(rest_client, "/apply_settings", None)
    assert reply["status"] == "failed" and "ctx_size" in reply["errors"][0]
    assert reply["model_status"] is False and reply["binding_status"] is True


async def test_engine_reloads_only_for_engine_settings(
        reload_client: tuple[TestClient, RecordingLoader]) -> None:
    client, loader = reload_client
    assert len(loader.loaded) == 1  # loaded at start-up
    await update(client, "temperature", 0.1)
    await update(client, "personality_language", "french")
    assert len(loader.loaded) == 1
    for name, value in (("ctx_size", 512), ("n_threads", 1)):
        assert (await update(client, name, value))["status"] is True
    assert [c.ctx_size for c in loader.loaded] == [1024, 512, 512]
    assert loader.loaded[-1].n_threads == 1
    assert await closed_count(loader, 2) == 2  # old engines closed
    applied = await post_json(client, "/apply_settings", None)
    assert applied["status"] == "succeeded" and applied["errors"] == []
    assert client.server.app[ENGINE_CONTROL].reloads == 2


async def test_failed_reload_leaves_config_and_engine(
        reload_client: tuple[TestClient, RecordingLoader]) -> None:
    client, loader = reload_client
    before = config_of(client)
    loader.fail = True
    reply = await update(client, "ctx_size", 256)
    assert reply["status"] is False and "not found" in reply["error"]
    assert config_of(client) == before
    models = before.models_dir
    models.mkdir(parents=True)
    (models / "other.gguf").write_bytes(b"GGUF")
    failed = await post_json(client, "/set_model", {"model": "other.gguf"})
    assert failed["status"] == "failed" and failed["error"]
    assert config_of(client) == before and loader.closed == 0
    loader.fail = False
    assert await post_json(client, "/set_model", {"model": "other.gguf"}) == {
        "status": "succeeded"}
    assert config_of(client).model == "other.gguf"
    assert await closed_count(loader, 1) == 1


async def test_reset_settings_restores_defaults_and_keeps_the_process_settings(
        reload_client: tuple[TestClient, RecordingLoader]) -> None:
    """reset_settings: what a file-less start would give (defaults, then the command line,
    which the test config sets: model, ctx_size, parallel...), keeping data dir, database,
    API key and UI dir; engine-level changes reload the engine; nothing is saved."""
    client, loader = reload_client
    start = config_of(client)
    for name, value in (("temperature", 0.1), ("top_k", 3), ("language", "fr-FR"),
                        ("personality_language", "french"), ("ctx_size", 512)):
        assert (await update(client, name, value))["status"] is True
    assert len(loader.loaded) == 2
    assert await post_json(client, "/reset_settings", None) == {"status": True}
    now = config_of(client)
    assert (now.temperature, now.top_k, now.language) == (0.9, 50, "en-US")  # defaults
    assert now.personality_language == "english"
    assert now.ctx_size == start.ctx_size == 1024  # the command line's value, not 2048
    assert now.model == start.model and now.data_dir == start.data_dir
    assert len(loader.loaded) == 3 and loader.loaded[-1].ctx_size == 1024  # reloaded
    assert not start.config_path.exists()  # reset is not a save


async def test_reset_settings_failure_changes_nothing(
        reload_client: tuple[TestClient, RecordingLoader]) -> None:
    client, loader = reload_client
    await update(client, "ctx_size", 512)
    before = config_of(client)
    loader.fail = True
    reply = await post_json(client, "/reset_settings", None)
    assert reply["status"] is False and "not found" in reply["error"]
    assert config_of(client) == before


async def test_reload_keeps_a_change_made_while_it_loads(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    """A setting changed while an engine reload is in progress is not lost when the reload
    finishes (the reload's changes are applied on top of the config of that moment)."""
    import threading

    release = threading.Event()
    loaded: list[Config] = []

    class SlowLoader(RecordingLoader):
        def __call__(self, config: Config) -> RecordingLoader:
            if loaded:  # the start-up load is quick; a reload waits for the test
                release.wait(10)
            loaded.append(config)
            return self

    client = await aiohttp_client(build_app(make_config(), backend_factory=SlowLoader()))
    reload = asyncio.ensure_future(update(client, "ctx_size", 512))
    for _ in range(500):
        if client.server.app[SETTINGS]._apply_lock.locked():
            break
        await asyncio.sleep(0.01)
    assert (await update(client, "temperature", 0.25))["status"] is True
    release.set()
    assert (await reload)["status"] is True
    now = config_of(client)
    assert (now.ctx_size, now.temperature) == (512, 0.25)


async def test_ctx_size_past_the_models_training_context_is_refused(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    """On the real model: the reload is refused with a clear error and nothing changes."""
    client = await aiohttp_client(build_app(make_config()))  # the real engine loader
    before = config_of(client)
    engine = client.server.app[ENGINE_CONTROL].current
    reply = await update(client, "ctx_size", 65536)
    assert reply["status"] is False and "training context" in reply["error"]
    assert config_of(client) == before
    assert client.server.app[ENGINE_CONTROL].current is engine


async def test_set_personality_chooses_all_three(rest_client: TestClient) -> None:
    """GET /set_personality (2023, from 05-23): language, category and folder at once,
    each checked against the folders on disk."""
    resp = await rest_client.get("/set_personality", params={
        "language": "french", "category": "general", "name": "assistant"})
    body = await resp.json()
    assert resp.status == 200 and body == {"status": "succeeded"}, body
    c = config_of(rest_client)
    assert (c.personality_language, c.personality_category, c.personality) == (
        "french", "general", "assistant")
    before = config_of(rest_client)
    for params in ({"language": "french", "category": "general", "name": "../../etc"},
                   {"language": "klingon", "category": "general", "name": "assistant"},
                   {"language": "french"}):
        resp = await rest_client.get("/set_personality", params=params)
        assert 400 <= resp.status < 500, params
        assert config_of(rest_client) == before


async def test_seed_era_aliases(rest_client: TestClient) -> None:
    assert await (await rest_client.get("/list_backends")).json() == ["llama_cpp"]
    assert await post_json(rest_client, "/set_backend", {"backend": "llama_cpp"}) == {
        "status": "succeeded"}
    resp = await rest_client.get("/set_personality_language", params={"language": "english"})
    assert await resp.json() == {"status": True, "success": True}
