"""Listing routes (SPEC 1) on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lollms_fast.server.keys import SETTINGS


async def get_json(client: TestClient, path: str, status: int = 200, **params: Any) -> Any:
    resp = await client.get(path, params=params)
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    return await resp.json()


def write_personality(root: Path, language: str, category: str, folder: str,
                      text: str) -> Path:
    path = root / language / category / folder
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(text, encoding="utf-8")
    return path


def data_dir(client: TestClient) -> Path:
    return client.server.app[SETTINGS].config.data_path


async def test_list_bindings(rest_client: TestClient) -> None:
    assert await get_json(rest_client, "/list_bindings") == ["llama_cpp"]


async def test_list_models(rest_client: TestClient) -> None:
    assert await get_json(rest_client, "/list_models") == []
    models = data_dir(rest_client) / "models" / "llama_cpp"
    models.mkdir(parents=True)
    for name in ("b.gguf", "a.gguf", "old.bin", "notes.txt", ".hidden.gguf"):
        (models / name).write_bytes(b"GGUF")
    (models / "dir.gguf").mkdir()
    assert await get_json(rest_client, "/list_models") == ["a.gguf", "b.gguf", "old.bin"]


async def test_list_languages(rest_client: TestClient) -> None:
    languages = await get_json(rest_client, "/list_languages")
    assert [x["value"] for x in languages] == ["en-US", "fr-FR", "ar-AR", "it-IT", "de-DE",
                                               "nl-XX", "zh-CN"]
    assert languages[2] == {"label": "العربية", "value": "ar-AR"}
    assert languages[6]["label"] == "中國人"


async def test_personality_listings(rest_client: TestClient) -> None:
    assert await get_json(rest_client, "/list_personalities_languages") == ["english",
                                                                            "french"]
    categories = await get_json(rest_client, "/list_personalities_categories")
    assert "general" in categories and len(categories) >= 3
    assert await get_json(rest_client, "/list_personalities_categories",
                          language="french") == ["general"]
    assert await get_json(rest_client, "/list_personalities_categories",
                          language="klingon") == []
    assert await get_json(rest_client, "/list_personalities_categories",
                          language="../..") == []
    assert "lollms" in await get_json(rest_client, "/list_personalities")
    assert await get_json(rest_client, "/list_personalities", language="french",
                          category="general") == ["assistant"]
    assert await get_json(rest_client, "/list_personalities", category="nope") == []


async def test_user_personalities_override_and_broken_skipped(rest_client: TestClient) -> None:
    root = data_dir(rest_client) / "personalities"
    write_personality(root, "english", "general", "lollms",
                      "name: my lollms\nauthor: me\nwelcome_message: hi {{date}}\n")
    write_personality(root, "english", "fun", "broken", "name: [unclosed\n")
    write_personality(root, "german", "general", "hallo", "name: Hallo\n")
    current = await get_json(rest_client, "/get_current_personality")
    assert current["personality"]["name"] == "my lollms"
    assert current["personality"]["welcome_message"] == "hi {{date}}"  # raw, as in 2023
    assert "german" in await get_json(rest_client, "/list_personalities_languages")
    assert await get_json(rest_client, "/list_personalities", category="fun") == []
    everything = await get_json(rest_client, "/get_all_personalities")
    assert everything["english"]["fun"] == []
    assert everything["german"]["general"][0]["name"] == "Hallo"


async def test_get_current_personality_keys(rest_client: TestClient) -> None:
    personality = (await get_json(rest_client, "/get_current_personality"))["personality"]
    for key in ("author", "version", "name", "user_name", "language", "category",
                "personality_description", "personality_conditioning", "welcome_message",
                "user_message_prefix", "link_text", "ai_message_prefix", "anti_prompts",
                "dependencies", "disclaimer", "model_temperature", "model_n_predicts",
                "model_top_k", "model_top_p", "model_repeat_penalty", "model_repeat_last_n",
                "assets_list"):
        assert key in personality, key
    assert personality["name"] == "lollms"


async def test_get_all_personalities_and_one(rest_client: TestClient) -> None:
    everything = await get_json(rest_client, "/get_all_personalities")
    entry = next(e for e in everything["english"]["general"] if e["folder"] == "lollms")
    assert set(entry) == {"folder", "name", "description", "author", "version",
                          "has_scripts", "has_logo", "avatar"}
    assert entry["has_logo"] and entry["avatar"].endswith("/assets/logo.png")
    avatar = await rest_client.get(entry["avatar"])  # the URL is served by the static routes
    assert avatar.status == 200 and avatar.headers["Content-Type"] == "image/png"
    one = await get_json(rest_client, "/get_personality", language="english",
                         category="general", name="lollms")
    assert one == entry
    err = await get_json(rest_client, "/get_personality", 404, language="english",
                         category="general", name="nobody")
    assert err["status"] is False
    await get_json(rest_client, "/get_personality", 404, language="..", category="..",
                   name="etc")
    await get_json(rest_client, "/get_personality", 400, language="english")


async def test_disk_usage_counts_the_models_folder(rest_client: TestClient) -> None:
    models = data_dir(rest_client) / "models" / "llama_cpp"
    models.mkdir(parents=True)
    (models / "m.gguf").write_bytes(b"G" * 12345)
    (models / "sub").mkdir()
    (models / "sub" / "x").write_bytes(b"x" * 55)
    usage = await get_json(rest_client, "/disk_usage")
    assert set(usage) == {"total_space", "available_space", "percent_usage",
                          "binding_models_usage"}
    assert usage["binding_models_usage"] == 12345 + 55
    assert 0 < usage["available_space"] <= usage["total_space"]
    assert 0.0 <= usage["percent_usage"] <= 100.0


async def test_get_config_has_the_seed_keys(rest_client: TestClient) -> None:
    config = await get_json(rest_client, "/get_config")
    for key in ("auto_read", "binding", "config", "ctx_size", "db_path", "debug", "host",
                "language", "model", "n_predict", "n_threads", "nb_messages_to_remember",
                "override_personality_model_parameters", "personality",
                "personality_category", "personality_language", "port", "repeat_last_n",
                "repeat_penalty", "seed", "temperature", "top_k", "top_p", "use_avx2",
                "use_gpu", "use_new_ui", "version", "voice"):
        assert key in config, key


@pytest.mark.parametrize("path", ["/list_discussions", "/list_bindings", "/get_config",
                                  "/get_generation_status", "/disk_usage"])
async def test_listing_routes_refuse_post(rest_client: TestClient, path: str) -> None:
    resp = await rest_client.post(path, data=b"{}")
    assert resp.status == 405
    assert (await resp.json())["status"] is False
