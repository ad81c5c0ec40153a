"""`build_app(config)`: the aiohttp application with Socket.IO, routes and middlewares.

Resources (the model, later the database) are opened in `cleanup_ctx` and closed in reverse
order on shutdown; nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .config import DEFAULT_MODEL_FILE, Config
from .engine.backend import Backend, BackendParams
from .modelfiles import resolve_model
from .server import middlewares, routes_settings
from .server.keys import BACKEND, SETTINGS, SIO
from .server.sockets import create_socketio
from .services.settings import SettingsService

log = logging.getLogger("lollms_fast")

BackendFactory = Callable[[Config], Backend]


def backend_params(config: Config) -> BackendParams:
    model_path = resolve_model(config.model, config.models_dir, DEFAULT_MODEL_FILE)
    return BackendParams(
        model_path=model_path,
        n_ctx=config.ctx_size * config.parallel,
        n_batch=config.n_batch,
        n_threads=config.n_threads,
        n_seq_max=config.parallel,
        use_gpu=config.use_gpu,
    )


def load_backend(config: Config) -> Backend:
    return Backend(backend_params(config))


def build_app(config: Config, *, backend_factory: BackendFactory | None = load_backend
              ) -> web.Application:
    """The whole server. `backend_factory=None` starts without a model (protocol tests)."""
    app = web.Application(
        client_max_size=config.max_body_size,
        middlewares=[
            middlewares.access_log_middleware,
            middlewares.errors_middleware,
            middlewares.api_key_middleware,
        ],
    )
    app[SETTINGS] = SettingsService(config)
    sio = create_socketio(config)
    sio.attach(app)
    app[SIO] = sio
    app.add_routes(routes_settings.routes)

    async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
        backend = None
        if backend_factory is not None:
            backend = await asyncio.to_thread(backend_factory, app[SETTINGS].config)
            app[BACKEND] = backend
        yield
        if backend is not None:
            await asyncio.to_thread(backend.close)

    async def close_sockets(app: web.Application) -> None:
        await sio.shutdown()

    app.cleanup_ctx.append(backend_ctx)
    app.on_shutdown.append(close_sockets)
    return app
