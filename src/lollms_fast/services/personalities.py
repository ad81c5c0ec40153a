"""Personalities for the routes: the library read off the event loop, and the configured one."""

from __future__ import annotations

import asyncio
from typing import Any

from ..personalities.loader import PersonalityLibrary
from ..personalities.model import Personality
from .settings import SettingsService


class PersonalityService:
    def __init__(self, library: PersonalityLibrary, settings: SettingsService) -> None:
        self.library = library
        self.settings = settings

    async def current(self) -> Personality:
        c = self.settings.config
        return await asyncio.to_thread(self.library.current, c.personality_language,
                                       c.personality_category, c.personality)

    async def languages(self) -> list[str]:
        return await asyncio.to_thread(self.library.languages)

    async def categories(self, language: str) -> list[str]:
        return await asyncio.to_thread(self.library.categories, language)

    async def folders(self, language: str, category: str) -> list[str]:
        return await asyncio.to_thread(self.library.folders, language, category)

    async def get(self, language: str, category: str, folder: str) -> Personality | None:
        return await asyncio.to_thread(self.library.get, language, category, folder)

    async def all_entries(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        return await asyncio.to_thread(self.library.all_entries)
