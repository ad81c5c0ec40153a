"""Typed application-state keys shared by the routes and the Socket.IO events."""

from __future__ import annotations

from typing import TYPE_CHECKING

import socketio
from aiohttp import web

if TYPE_CHECKING:
    from ..engine.metrics import EngineMetrics
    from ..engine.scheduler import Engine
    from ..services.chat import ChatService
    from ..services.completions import CompletionService
    from ..services.discussions import DiscussionService
    from ..services.engine_control import EngineControl
    from ..services.models import ModelService
    from ..services.personalities import PersonalityService
    from ..services.sessions import SessionStore
    from ..services.settings import SettingsService
    from ..storage.base import Store

SETTINGS: web.AppKey[SettingsService] = web.AppKey("settings")
SIO: web.AppKey[socketio.AsyncServer] = web.AppKey("sio")
STORE: web.AppKey[Store] = web.AppKey("store")
SESSIONS: web.AppKey[SessionStore] = web.AppKey("sessions")
DISCUSSIONS: web.AppKey[DiscussionService] = web.AppKey("discussions")
PERSONALITIES: web.AppKey[PersonalityService] = web.AppKey("personalities")
CHAT: web.AppKey[ChatService] = web.AppKey("chat")
COMPLETIONS: web.AppKey[CompletionService] = web.AppKey("completions")
ENGINE_CONTROL: web.AppKey[EngineControl[Engine]] = web.AppKey("engine_control")
MODELS: web.AppKey[ModelService] = web.AppKey("models")
ENGINE_METRICS: web.AppKey[EngineMetrics] = web.AppKey("engine_metrics")
