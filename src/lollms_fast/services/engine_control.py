"""The running model engine, reloaded off the event loop when a Config needs another one.

It knows nothing of settings: `apply(config)` makes the engine match a Config (loading a new
one if an engine-level key differs from what the running engine was built with) and returns
the errors. Which keys need a reload is `config.reload_keys`. A new engine is loaded before
the old one is closed, so a failed load leaves the old one serving; the replaced engine is
closed in the background (the closer may wait for the answers still running on it).

Loads and closes run on threads of their own, never on the default executor that the rest
of the server shares; one reload at a time, and none while a replaced engine still drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from ..config import Config, reload_keys
from ..errors import LollmsError

log = logging.getLogger("lollms_fast.engine_control")

E = TypeVar("E")

NO_ENGINE = "this server runs without a model engine; cannot apply "
# a reload waits this long for a replaced engine that is finishing its answers, then gives up
DRAIN_WAIT_S = 5.0
STILL_DRAINING = ("the previous model is still finishing its answers; retry once they are done "
                  "(at most a couple of minutes)")


class EngineControl(Generic[E]):
    def __init__(self, loader: Callable[[Config], E] | None,
                 closer: Callable[[E], None] | None = None) -> None:
        self._loader = loader
        self._closer = closer
        self._lock = asyncio.Lock()
        self.current: E | None = None
        self.applied: Config | None = None  # the config the current engine was built from
        self.reloads = 0
        self._closing: set[asyncio.Future[None]] = set()
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-load")
        self._close_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-close")

    @property
    def can_load(self) -> bool:
        return self._loader is not None

    def pending(self, config: Config) -> list[str]:
        """Engine-level settings of `config` that the running engine was not built with."""
        return [] if self.applied is None else reload_keys(self.applied, config)

    async def start(self, config: Config) -> None:
        """Load the first engine (if there is a loader) and record its config."""
        if self._loader is not None:
            loop = asyncio.get_running_loop()
            self.current = await loop.run_in_executor(self._load_pool, self._loader, config)
        self.applied = config

    async def stop(self) -> None:
        async with self._lock:
            old, self.current = self.current, None
            if old is not None and self._closer is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._closer, old)
            if self._closing:  # an engine replaced by a reload and still draining
                await asyncio.gather(*self._closing, return_exceptions=True)
        self._load_pool.shutdown(wait=False)
        self._close_pool.shutdown(wait=False)

    async def apply(self, config: Config) -> list[str]:
        """Make the engine match `config`: reload it if an engine-level key differs. Returns
        the errors (empty on success); on an error the running engine is unchanged."""
        async with self._lock:
            keys = self.pending(config)
            if not keys:
                return []
            if self._loader is None:
                return [NO_ENGINE + ", ".join(keys)]
            if self._closing:  # at most one engine drains: wait a little, then refuse
                await asyncio.wait(set(self._closing), timeout=DRAIN_WAIT_S)
                if self._closing:
                    return [STILL_DRAINING]
            log.info("reloading the engine for %s", ", ".join(keys))
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(self._load_pool, self._loader, config)
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
        future = asyncio.get_running_loop().run_in_executor(self._close_pool, self._closer, old)
        self._closing.add(future)
        future.add_done_callback(self._closing.discard)
