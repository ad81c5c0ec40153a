"""The running model engine, reloaded off the event loop when a Config needs another one.

It knows nothing of settings: `apply(config)` makes the engine match a Config (loading a new
one if an engine-level key differs from what the running engine was built with) and returns
the errors. Which keys need a reload is `config.reload_keys`. A new engine is loaded before
the old one is closed, so a failed load leaves the old one serving; the replaced engine is
closed in the background (the closer may wait for the answers still running on it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from ..config import Config, reload_keys
from ..errors import LollmsError

log = logging.getLogger("lollms_fast.engine_control")

E = TypeVar("E")

NO_ENGINE = "this server runs without a model engine; cannot apply "


class EngineControl(Generic[E]):
    def __init__(self, loader: Callable[[Config], E] | None,
                 closer: Callable[[E], None] | None = None) -> None:
        self._loader = loader
        self._closer = closer
        self._lock = asyncio.Lock()
        self.current: E | None = None
        self.applied: Config | None = None  # the config the current engine was built from
        self.reloads = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def can_load(self) -> bool:
        return self._loader is not None

    def pending(self, config: Config) -> list[str]:
        """Engine-level settings of `config` that the running engine was not built with."""
        return [] if self.applied is None else reload_keys(self.applied, config)

    async def start(self, config: Config) -> None:
        """Load the first engine (if there is a loader) and record its config."""
        if self._loader is not None:
            self.current = await asyncio.to_thread(self._loader, config)
        self.applied = config

    async def stop(self) -> None:
        async with self._lock:
            old, self.current = self.current, None
            if old is not None and self._closer is not None:
                await asyncio.to_thread(self._closer, old)
            if self._closing:  # engines replaced by reloads and still draining
                await asyncio.gather(*self._closing, return_exceptions=True)

    async def apply(self, config: Config) -> list[str]:
        """Make the engine match `config`: reload it if an engine-level key differs. Returns
        the errors (empty on success); on an error the running engine is unchanged."""
        async with self._lock:
            keys = self.pending(config)
            if not keys:
                return []
            if self._loader is None:
                return [NO_ENGINE + ", ".join(keys)]
            log.info("reloading the engine for %s", ", ".join(keys))
            try:
                new = await asyncio.to_thread(self._loader, config)
            except LollmsError as exc:
                return [exc.message]
            except Exception as exc:  # a loader failure must not kill the server
                log.exception("engine reload failed")
                return [f"engine reload failed: {type(exc).__name__}"]
            old, self.current, self.applied = self.current, new, config
            self.reloads += 1
            if old is not None:
                self._close_later(old)
            return []

    def _close_later(self, old: E) -> None:
        if self._closer is None:
            return
        task = asyncio.ensure_future(asyncio.to_thread(self._closer, old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
