"""Typed application-state keys shared by the routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import socketio
from aiohttp import web

if TYPE_CHECKING:
    from ..engine.backend import Backend
    from ..services.settings import SettingsService

SETTINGS = web.AppKey("settings", "SettingsService")
SIO = web.AppKey("sio", socketio.AsyncServer)
BACKEND = web.AppKey("backend", "Backend")
