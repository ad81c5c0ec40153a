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

# discussions, sessions and personalities (lollms REST)
if TYPE_CHECKING:
    from ..services.chat import ChatService
    from ..services.discussions import DiscussionService
    from ..services.engine_control import EngineControl
    from ..services.personalities import PersonalityService
    from ..services.sessions import SessionStore
    from ..storage.db import Database

DATABASE = web.AppKey("database", "Database")
SESSIONS = web.AppKey("sessions", "SessionStore")
DISCUSSIONS = web.AppKey("discussions", "DiscussionService")
PERSONALITIES = web.AppKey("personalities", "PersonalityService")
CHAT = web.AppKey("chat", "ChatService")
ENGINE_CONTROL = web.AppKey("engine_control", "EngineControl[Any]")
