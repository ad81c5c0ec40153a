"""Settings, binding, model and personality routes (SPEC section 3, and /get_config).

The logic lives in `SettingsService`, shared with the Socket.IO events of the same names.
"""

from __future__ import annotations

from aiohttp import web

from .keys import SETTINGS
from .requests import query_str, read_json_object, require_field
from .responses import json_response
from .security import changes_state

routes = web.RouteTableDef()

# `status` is the SPEC's field; seed-era scripts read `success`
CHOSEN = {"status": True, "success": True}


@routes.get("/get_config")
async def get_config(request: web.Request) -> web.Response:
    return json_response(request.app[SETTINGS].config.to_dict())


@routes.post("/update_setting")
async def update_setting(request: web.Request) -> web.Response:
    reply, status = await request.app[SETTINGS].update_setting(await read_json_object(request))
    return json_response(reply, status=status)


@routes.post("/save_settings")
async def save_settings(request: web.Request) -> web.Response:
    reply = await request.app[SETTINGS].save_reply()
    return json_response(reply, status=200 if reply["status"] else 500)


@routes.post("/apply_settings")
async def apply_settings(request: web.Request) -> web.Response:
    return json_response(await request.app[SETTINGS].apply_pending())


@routes.get("/set_personality_language", allow_head=False)  # HEAD must not change state
@changes_state
async def set_personality_language(request: web.Request) -> web.Response:
    language = query_str(request, "language")
    await request.app[SETTINGS].change({"personality_language": language})
    return json_response(CHOSEN)


@routes.get("/set_personality_category", allow_head=False)  # HEAD must not change state
@changes_state
async def set_personality_category(request: web.Request) -> web.Response:
    category = query_str(request, "category")
    await request.app[SETTINGS].change({"personality_category": category})
    return json_response(CHOSEN)


@routes.get("/set_personality", allow_head=False)  # HEAD must not change state
@changes_state
async def set_personality(request: web.Request) -> web.Response:
    """The 2023 route (from 05-23) choosing language, category and personality at once; each
    is checked against the personality folders (never used to build a path)."""
    raw = {key: query_str(request, param) for key, param in (
        ("personality_language", "language"), ("personality_category", "category"),
        ("personality", "name"))}
    return json_response(await request.app[SETTINGS].change(raw))


@routes.post("/set_binding")
async def set_binding(request: web.Request) -> web.Response:
    binding = require_field(await read_json_object(request), "binding", str)
    return json_response(await request.app[SETTINGS].change({"binding": binding}))


@routes.post("/set_backend")
async def set_backend(request: web.Request) -> web.Response:
    """The seed era's name of /set_binding (`{"backend"}`)."""
    binding = require_field(await read_json_object(request), "backend", str)
    return json_response(await request.app[SETTINGS].change({"binding": binding}))


@routes.post("/set_model")
async def set_model(request: web.Request) -> web.Response:
    model = require_field(await read_json_object(request), "model", str)
    return json_response(await request.app[SETTINGS].change({"model": model}))


@routes.post("/update_model_params")
async def update_model_params(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    return json_response(await request.app[SETTINGS].update_model_params(body))


@routes.post("/reset_settings")
async def reset_settings(request: web.Request) -> web.Response:
    return json_response(await request.app[SETTINGS].reset())
