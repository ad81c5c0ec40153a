"""`build_app(config)`: the aiohttp application with Socket.IO, routes and middlewares.

Resources (the database, the model engine) are opened in `cleanup_ctx` and closed in
reverse order on shutdown; nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .config import Config
from .engine import Engine, EngineMetrics, load_engine
from .personalities.loader import PersonalityLibrary
from .server import (
    middlewares,
    routes_discussions,
    routes_listing,
    routes_openai,
    routes_ops,
    routes_settings,
    routes_static,
    security,
)
from .server.keys import (
    CHAT,
    COMPLETIONS,
    DISCUSSIONS,
    ENGINE_CONTROL,
    ENGINE_METRICS,
    MODELS,
    PERSONALITIES,
    SESSIONS,
    SETTINGS,
    SIO,
    STORE,
)
from .server.session import set_session_cookie
from .server.sockets import create_socketio
from .services.chat import ChatService
from .services.cluster import Cluster, join
from .services.completions import CompletionService
from .services.discussions import DiscussionService
from .services.engine_control import EngineControl
from .services.models import ModelService
from .services.personalities import PersonalityService
from .services.sessions import SessionStore
from .services.settings import SettingsService
from .storage import open_store

log = logging.getLogger("lollms_fast")

# Config -> a started engine (blocking: run in a thread); tests pass scripted ones
EngineLoader = Callable[[Config], Engine]


# after a reload the old engine keeps serving the answers it has begun for up to this long
RELOAD_DRAIN_S = 120.0


def close_engine(engine: Engine, drain_s: float = RELOAD_DRAIN_S) -> None:
    """Blocking (runs in a thread). New requests already go to the new engine; answers still
    running or queued on this one get `drain_s` to finish before it is closed (closing
    cancels whatever is left, and those answers end as `cancelled`, saved). At shutdown
    the chat service has cancelled everything first, so this returns at once."""
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        figures = engine.stats()
        if not figures["slots_busy"] and not figures["queued"]:
            break
        time.sleep(0.05)
    engine.close()


def build_app(config: Config, *, backend_factory: EngineLoader | None = load_engine
              ) -> web.Application:
    """The whole server. `backend_factory=None` starts without a model (protocol tests)."""
    app = web.Application(
        client_max_size=config.max_body_size,
        middlewares=[
            middlewares.access_log_middleware,
            middlewares.errors_middleware,
            security.security_middleware(config),  # Host and origin, before the key
            middlewares.api_key_middleware,
        ],
    )
    app.on_response_prepare.append(security.security_headers)
    # the session cookie goes on every response, errors and 401s included (SPEC "Sessions")
    app.on_response_prepare.append(set_session_cookie)
    app.on_response_prepare.append(routes_openai.cors_headers)
    library = PersonalityLibrary(config.personalities_dir)
    engine_metrics = EngineMetrics()  # one for every engine of this app: counters never reset

    def load(config: Config) -> Engine:
        assert backend_factory is not None
        loaded = backend_factory(config)
        loaded.metrics = engine_metrics  # before any request reaches it
        return loaded

    engine: EngineControl[Engine] = EngineControl(
        load if backend_factory is not None else None, close_engine)
    settings = SettingsService(config, library=library, engine=engine)
    personalities = PersonalityService(library, settings)
    # the Socket.IO connect handler finds the HTTP session here from its handshake request
    sessions = SessionStore()
    store = open_store(config.database_url, root=config.data_path, durable=config.durable)
    app[SETTINGS] = settings
    app[ENGINE_CONTROL] = engine
    app[ENGINE_METRICS] = engine_metrics
    app[PERSONALITIES] = personalities
    app[SESSIONS] = sessions
    app[STORE] = store
    discussions = DiscussionService(store, sessions, personalities, settings)
    app[DISCUSSIONS] = discussions
    chat = ChatService(store, discussions, personalities, settings, engine)
    app[CHAT] = chat
    models = ModelService(settings, engine)
    app[MODELS] = models
    completions = CompletionService(settings, personalities, engine)
    app[COMPLETIONS] = completions

    cluster = Cluster(config.socketio_redis_url) if config.socketio_redis_url else None
    sio = create_socketio(config, app, redis_url=config.socketio_redis_url or None)
    sio.attach(app)
    app[SIO] = sio
    app.add_routes(routes_settings.routes)
    app.add_routes(routes_listing.routes)
    app.add_routes(routes_discussions.routes)
    app.add_routes(routes_ops.routes)
    app.add_routes(routes_openai.routes)
    app[routes_ops.METRICS_REGISTRY] = routes_ops.metrics_registry(app)
    app.add_routes(routes_static.routes)  # last: holds the /{filename} catch-all

    async def cluster_ctx(_app: web.Application) -> AsyncIterator[None]:
        # first: a replica that cannot reach Redis refuses to start rather than serve
        # sessions and stop_gen that the others do not see
        assert cluster is not None
        await cluster.start()
        join(cluster, sessions, settings)
        yield
        await cluster.close()

    async def storage_ctx(_app: web.Application) -> AsyncIterator[None]:
        await store.start()
        log.info("discussions stored in %s (schema version %d)", store.describe(),
                 store.schema_version)
        yield
        await store.close()

    async def engine_ctx(_app: web.Application) -> AsyncIterator[None]:
        await engine.start(settings.config)
        yield
        await chat.shutdown()  # running answers end as `cancelled` and are saved
        await completions.shutdown()
        await engine.stop()

    async def close_sockets(_app: web.Application) -> None:
        # running answers end first (saved as `cancelled`, their clients told by `final`),
        # then every client is disconnected: aiohttp would otherwise wait for each open
        # WebSocket until its ping timeout (75 s) before the process could exit
        await chat.shutdown()
        await completions.shutdown()
        for eio_sid, sock in list(sio.eio.sockets.items()):
            try:  # the close packet is queued; a polling client may never come to fetch it
                await asyncio.wait_for(sock.close(wait=False), 5)
            except Exception:  # a socket already gone
                log.debug("socket %s was gone at shutdown", eio_sid)
            sio.eio.sockets.pop(eio_sid, None)
        await sio.shutdown()

    async def stop_downloads(_app: web.Application) -> None:
        await models.shutdown()  # running installs stop and remove their partial files

    if cluster is not None:
        app.cleanup_ctx.append(cluster_ctx)
    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(engine_ctx)
    app.on_shutdown.append(stop_downloads)
    app.on_shutdown.append(close_sockets)
    return app
