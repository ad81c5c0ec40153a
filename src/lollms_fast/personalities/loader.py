"""Finding and loading personalities from their roots (built-in first, the user's data dir
second; the user's wins on a name clash). Broken folders are skipped with one warning.

Everything here touches the disk: call it from a thread (the services do).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import yaml

from ..errors import NotFound
from .model import Personality, PersonalityError

log = logging.getLogger("lollms_fast.personalities")

BUILTIN_ROOT = Path(__file__).resolve().parent / "builtin"
DEFAULT_KEY = ("english", "general", "lollms")

# used only if even the built-in default is unreadable (a damaged install)
_FALLBACK = {
    "name": "lollms", "author": "lollms_fast", "category": "general",
    "personality_description": "A helpful assistant.",
    "personality_conditioning": "## Information:\nAssistant's name is lollms\n"
                                "Today's date is {{date}}\n",
    "user_message_prefix": "### user:\n", "ai_message_prefix": "### lollms:\n",
    "anti_prompts": ["###user", "### user", "###lollms", "### lollms"],
}


def safe_name(name: str) -> bool:
    """One plain path component: no separators, no `.`/`..`, no hidden or control chars."""
    return (0 < len(name) <= 255 and name not in (".", "..") and not name.startswith(".")
            and "/" not in name and "\\" not in name
            and all(ord(ch) >= 32 for ch in name))


class PersonalityLibrary:
    def __init__(self, user_root: Path | None, builtin_root: Path = BUILTIN_ROOT) -> None:
        # later roots win
        self.roots: tuple[Path, ...] = tuple(
            r for r in (builtin_root, user_root) if r is not None)
        self._cache: dict[Path, tuple[tuple[int, int], Personality | None]] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------ folders

    def _subdirs(self, *parts: str) -> dict[str, tuple[Path, Path]]:
        """name -> (folder, root) of the sub-folders at `parts` across roots (later wins);
        folders whose real path leaves their root (symlinks) are ignored."""
        found: dict[str, tuple[Path, Path]] = {}
        if not all(safe_name(p) for p in parts):
            return found
        for root in self.roots:
            base = root.joinpath(*parts)
            try:
                children = list(base.iterdir())
            except OSError:
                continue
            real_root = root.resolve()
            for child in children:
                if not safe_name(child.name):
                    continue
                try:
                    if child.is_dir() and child.resolve().is_relative_to(real_root):
                        found[child.name] = (child, root)
                except OSError:
                    continue
        return found

    def languages(self) -> list[str]:
        return sorted(self._subdirs())

    def categories(self, language: str) -> list[str]:
        return sorted(self._subdirs(language))

    def folders(self, language: str, category: str) -> list[str]:
        """Personality folders that load (broken ones are left out)."""
        return [name for name in sorted(self._subdirs(language, category))
                if self.get(language, category, name) is not None]

    def select(self, current: tuple[str, str, str], language: str | None = None,
               category: str | None = None, folder: str | None = None
               ) -> tuple[str, str, str]:
        """(language, category, folder) after choosing some of them. A level given must exist
        (NotFound otherwise); a level left out keeps `current`'s value if it still exists under
        the new choice, else falls back to `general` / the first one available, so the three
        config keys always name a personality together."""
        lang = current[0] if language is None else language
        if language is not None and language not in self.languages():
            raise NotFound(f"unknown personality language {language!r}")
        categories = self.categories(lang)
        cat = current[1] if category is None else category
        if category is not None and category not in categories:
            raise NotFound(f"unknown personality category {category!r} for {lang}")
        if cat not in categories and categories:
            cat = "general" if "general" in categories else categories[0]
        folders = self.folders(lang, cat)
        name = current[2] if folder is None else folder
        if folder is not None and folder not in folders:
            raise NotFound(f"unknown personality {folder!r} in {lang}/{cat}")
        if name not in folders and folders:
            name = folders[0]
        return lang, cat, name

    # ------------------------------------------------------------ loading

    def get(self, language: str, category: str, folder: str) -> Personality | None:
        """The personality, from the last root that has a loadable one; None if none does."""
        if not all(safe_name(p) for p in (language, category, folder)):
            return None
        for root in reversed(self.roots):
            path = root / language / category / folder
            personality = self._load(root, path, language, category, folder)
            if personality is not None:
                return personality
        return None

    def _load(self, root: Path, path: Path, language: str, category: str, folder: str
              ) -> Personality | None:
        cfg = path / "config.yaml"
        try:
            real = cfg.resolve(strict=True)
            if not real.is_relative_to(root.resolve()):
                return None
            st = real.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(cfg)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        personality: Personality | None
        try:
            raw: Any = yaml.safe_load(real.read_text(encoding="utf-8"))
            personality = Personality.from_mapping(
                language, category, folder, path, raw,
                assets=self._assets(path), has_scripts=(path / "scripts").is_dir())
        except (OSError, UnicodeDecodeError, yaml.YAMLError, PersonalityError) as exc:
            log.warning("skipping personality %s/%s/%s: %s", language, category, folder,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            personality = None
        with self._lock:
            self._cache[cfg] = (stamp, personality)
        return personality

    @staticmethod
    def _assets(path: Path) -> tuple[str, ...]:
        try:
            return tuple(sorted(p.name for p in (path / "assets").iterdir()
                                if p.is_file() and safe_name(p.name)))
        except OSError:
            return ()

    def current(self, language: str, category: str, folder: str) -> Personality:
        """The configured personality, else the built-in default (never fails)."""
        personality = self.get(language, category, folder)
        key = (language, category, folder)
        if personality is None and key != DEFAULT_KEY and key not in self._warned:
            self._warned.add(key)
            log.warning("personality %s/%s/%s not found or broken; using the default",
                        language, category, folder)
        if personality is None:
            personality = self.get(*DEFAULT_KEY)
        if personality is None:
            personality = Personality.from_mapping(*DEFAULT_KEY, BUILTIN_ROOT, _FALLBACK)
        return personality

    def all_entries(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for language in self.languages():
            by_category: dict[str, list[dict[str, Any]]] = {}
            for category in self.categories(language):
                entries = []
                for folder in sorted(self._subdirs(language, category)):
                    personality = self.get(language, category, folder)
                    if personality is not None:
                        entries.append(personality.entry())
                by_category[category] = entries
            out[language] = by_category
        return out
