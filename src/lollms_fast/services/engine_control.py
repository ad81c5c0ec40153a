"""The seam between settings and the model engine: which engine-level settings are pending,
and reloading the engine for them off the event loop.

The app gives it a loader (Config -> engine, blocking; run in a thread) and a closer. A new
engine is loaded before the old one is closed, so a failed load leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from ..config import Config
from ..errors import LollmsError
from .settings import SettingsService

log = logging.getLogger("lollms_fast.engine_control")

E = TypeVar("E")


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
        """Engine-level settings that differ from what the running engine was built with."""
        if self.applied is None:
            return []
        return config.changed_reload_keys(self.applied)

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

    def _close_later(self, old: E) -> None:
        """The replaced engine is closed in the background: the closer may wait for the
        answers still running on it, and the request that caused the reload need not."""
        if self._closer is None:
            return
        task = asyncio.ensure_future(asyncio.to_thread(self._closer, old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def apply(self, config: Config) -> list[str]:
        """Reload the engine if `config` has pending engine-level changes; the errors."""
        async with self._lock:
            keys = self.pending(config)
            if not keys:
                return []
            if self._loader is None:
                return ["this server runs without a model engine; cannot apply "
                        + ", ".join(keys)]
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

    async def switch(self, settings: SettingsService, changes: Mapping[str, Any]) -> list[str]:
        """Apply validated `changes` and reload; on failure the changes are undone."""
        before = settings.config
        settings.update(changes)
        errors = await self.apply(settings.config)
        if errors:
            settings.update({k: getattr(before, k) for k in changes})
        return errors
