"""Listing routes (SPEC section 1): bindings, models, the model zoo, personalities, languages,
discussions, disk usage, generation status."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from ..config import SETTINGS_BY_NAME
from ..errors import NotFound
from ..modelfiles import list_models
from .keys import DISCUSSIONS, MODELS, PERSONALITIES, SETTINGS
from .requests import query_str
from .responses import json_bytes_response, json_response
from .session import client_session

routes = web.RouteTableDef()

LANGUAGES = (
    {"label": "English", "value": "en-US"},
    {"label": "Français", "value": "fr-FR"},
    {"label": "العربية", "value": "ar-AR"},
    {"label": "Italiano", "value": "it-IT"},
    {"label": "Deutsch", "value": "de-DE"},
    {"label": "Dutch", "value": "nl-XX"},
    {"label": "中國人", "value": "zh-CN"},
)


@routes.get("/list_bindings")
@routes.get("/list_backends")  # the seed era's name
async def list_bindings(_request: web.Request) -> web.Response:
    return json_response(list(SETTINGS_BY_NAME["binding"].choices or ()))


@routes.get("/list_models")
async def list_models_route(request: web.Request) -> web.Response:
    models_dir = request.app[SETTINGS].config.models_dir
    return json_response(await asyncio.to_thread(list_models, models_dir))


@routes.get("/get_available_models")
async def get_available_models(request: web.Request) -> web.Response:
    return json_response(await request.app[MODELS].available())


@routes.get("/list_personalities_languages")
async def list_personalities_languages(request: web.Request) -> web.Response:
    return json_response(await request.app[PERSONALITIES].languages())


@routes.get("/list_personalities_categories")
async def list_personalities_categories(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].config
    language = query_str(request, "language", required=False) or config.personality_language
    return json_response(await request.app[PERSONALITIES].categories(language))


@routes.get("/list_personalities")
async def list_personalities(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].config
    language = query_str(request, "language", required=False) or config.personality_language
    category = query_str(request, "category", required=False) or config.personality_category
    return json_response(await request.app[PERSONALITIES].folders(language, category))


@routes.get("/list_languages")
async def list_languages(_request: web.Request) -> web.Response:
    return json_response(LANGUAGES)


@routes.get("/list_discussions")
async def list_discussions(request: web.Request) -> web.Response:
    return json_bytes_response(await request.app[DISCUSSIONS].list_json())


@routes.get("/get_current_personality")
async def get_current_personality(request: web.Request) -> web.Response:
    personality = await request.app[PERSONALITIES].current()
    return json_response({"personality": personality.as_dict()})


@routes.get("/get_all_personalities")
async def get_all_personalities(request: web.Request) -> web.Response:
    return json_response(await request.app[PERSONALITIES].all_entries())


@routes.get("/get_personality")
async def get_personality(request: web.Request) -> web.Response:
    language = query_str(request, "language")
    category = query_str(request, "category")
    name = query_str(request, "name")
    assert language is not None and category is not None and name is not None
    personality = await request.app[PERSONALITIES].get(language, category, name)
    if personality is None:
        raise NotFound(f"personality {language}/{category}/{name} not found")
    return json_response(personality.entry())


def folder_size(root: Path) -> int:
    """Bytes of the regular files under `root` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def disk_usage(data_dir: Path, models_dir: Path) -> dict[str, Any]:
    probe = data_dir if data_dir.exists() else Path(data_dir.anchor or "/")
    usage = psutil.disk_usage(str(probe))
    return {
        "total_space": usage.total,
        "available_space": usage.free,
        "percent_usage": usage.percent,
        "binding_models_usage": folder_size(models_dir),
    }


@routes.get("/disk_usage")
async def disk_usage_route(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].config
    return json_response(await asyncio.to_thread(disk_usage, config.data_path,
                                                 config.models_dir))


@routes.get("/get_generation_status")
async def get_generation_status(request: web.Request) -> web.Response:
    session = await client_session(request)
    return json_response({"status": session.generating})
