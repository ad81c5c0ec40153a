"""Settings routes (section 3 and /get_config of the SPEC)."""

from __future__ import annotations

from aiohttp import web

from .keys import SETTINGS
from .responses import json_response

routes = web.RouteTableDef()


@routes.get("/get_config")
async def get_config(request: web.Request) -> web.Response:
    return json_response(request.app[SETTINGS].config.to_dict())
