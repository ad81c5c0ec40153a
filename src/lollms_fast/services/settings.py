"""The live configuration: validated in-memory changes, and atomic saves to local_config.yaml."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config


class SettingsService:
    """Holds the current (immutable) Config; every change swaps in a new, validated one."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._save_lock = asyncio.Lock()

    @property
    def config(self) -> Config:
        return self._config

    def update(self, changes: Mapping[str, Any]) -> Config:
        """Apply validated changes in memory (BadRequest leaves the config untouched)."""
        self._config = self._config.updated(changes)
        return self._config

    async def save(self) -> Path:
        """Write local_config.yaml atomically, off the event loop."""
        async with self._save_lock:
            return await asyncio.to_thread(self._config.save)
