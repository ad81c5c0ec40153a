"""One personality: its 2023 `config.yaml` keys, parsed and checked, with use-time templating."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LollmsError

# the keys of the seed's /get_current_personality example, in the 2023 file format
STRING_KEYS = ("author", "version", "name", "user_name", "language", "category",
               "personality_description", "personality_conditioning", "welcome_message",
               "user_message_prefix", "link_text", "ai_message_prefix", "disclaimer")
LIST_KEYS = ("anti_prompts", "dependencies")
FLOAT_KEYS = ("model_temperature", "model_top_p", "model_repeat_penalty")
INT_KEYS = ("model_n_predicts", "model_top_k", "model_repeat_last_n")

# the 2023 library's defaults for keys a file leaves out
DEFAULTS: dict[str, Any] = {
    "author": "unknown", "version": "1.0.0", "name": "", "user_name": "user",
    "language": "en_XX", "category": "", "personality_description": "",
    "personality_conditioning": "", "welcome_message": "",
    "user_message_prefix": "### Human:\n", "link_text": "\n",
    "ai_message_prefix": "### Assistant:\n", "disclaimer": "",
    "anti_prompts": ["###Human", "###Assistant", "### Human", "### Assistant"],
    "dependencies": [],
    "model_temperature": 0.8, "model_n_predicts": 1024, "model_top_k": 50, "model_top_p": 0.95,
    "model_repeat_penalty": 1.3, "model_repeat_last_n": 40,
}

AVATAR_NAMES = ("logo.gif", "logo.webp", "logo.png", "logo.jpg", "logo.jpeg", "logo.bmp")

_TEMPLATE = re.compile(r"\{\{(\w+)\}\}")


class PersonalityError(LollmsError, ValueError):
    """A personality folder whose config.yaml is unusable."""


def template_values(now: _dt.datetime | None = None) -> dict[str, str]:
    now = now or _dt.datetime.now()
    return {
        "date": now.strftime("%A, %B %d, %Y"),
        "time": now.strftime("%H:%M:%S"),
        "date_time": now.strftime("%A, %B %d, %Y %I:%M:%S %p"),
    }


def expand(text: str, now: _dt.datetime | None = None) -> str:
    """`{{date}}`, `{{time}}`, `{{date_time}}` at the moment of use; unknown keys stay."""
    if "{{" not in text:
        return text
    values = template_values(now)
    return _TEMPLATE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _check(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    if "author" not in data and isinstance(data.get("creator"), str):
        out["author"] = data["creator"]  # files older than the anchor used `creator`
    for key in STRING_KEYS:
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # `version: 1.0` is a YAML float
            if not isinstance(value, str):
                raise PersonalityError(f"{key} must be text")
            out[key] = value
    for key in LIST_KEYS:
        if key in data and data[key] is not None:
            value = data[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PersonalityError(f"{key} must be a list of strings")
            out[key] = list(value)
    for key in FLOAT_KEYS + INT_KEYS:
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PersonalityError(f"{key} must be a number")
            out[key] = int(value) if key in INT_KEYS else float(value)
    return out


@dataclass(frozen=True)
class ModelParams:
    """The personality's `model_*` sampling values (used unless the config overrides them);
    `n_predict` 0 means "the config's"."""

    temperature: float
    n_predict: int
    top_k: int
    top_p: float
    repeat_penalty: float
    repeat_last_n: int


@dataclass(frozen=True)
class Personality:
    language: str  # folder names (what the config's personality_* keys hold)
    category: str
    folder: str
    path: Path
    data: dict[str, Any] = field(repr=False)
    assets: tuple[str, ...] = ()  # file names in assets/
    has_scripts: bool = False

    @classmethod
    def from_mapping(cls, language: str, category: str, folder: str, path: Path,
                     raw: Any, assets: tuple[str, ...] = (), has_scripts: bool = False
                     ) -> Personality:
        if not isinstance(raw, Mapping):
            raise PersonalityError("config.yaml must hold a mapping")
        data = _check(raw)
        if not data["name"]:
            data["name"] = folder
        return cls(language, category, folder, path, data, assets, has_scripts)

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def user_message_prefix(self) -> str:
        return str(self.data["user_message_prefix"])

    @property
    def ai_message_prefix(self) -> str:
        return str(self.data["ai_message_prefix"])

    @property
    def link_text(self) -> str:
        return str(self.data["link_text"])

    @property
    def anti_prompts(self) -> list[str]:
        return list(self.data["anti_prompts"])

    @property
    def user_name(self) -> str:
        return str(self.data["user_name"])

    @property
    def model_params(self) -> ModelParams:
        d = self.data
        return ModelParams(temperature=float(d["model_temperature"]),
                           n_predict=int(d["model_n_predicts"]), top_k=int(d["model_top_k"]),
                           top_p=float(d["model_top_p"]),
                           repeat_penalty=float(d["model_repeat_penalty"]),
                           repeat_last_n=int(d["model_repeat_last_n"]))

    def conditioning(self, now: _dt.datetime | None = None) -> str:
        return expand(str(self.data["personality_conditioning"]), now)

    def welcome_message(self, now: _dt.datetime | None = None) -> str:
        return expand(str(self.data["welcome_message"]), now)

    @property
    def url_base(self) -> str:
        return f"/personalities/{self.language}/{self.category}/{self.folder}"

    @property
    def avatar(self) -> str:
        for name in AVATAR_NAMES:
            if name in self.assets:
                return f"{self.url_base}/assets/{name}"
        return ""

    def as_dict(self) -> dict[str, Any]:
        """The /get_current_personality shape: raw (unexpanded) texts, as in 2023."""
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in self.data.items()}
        out["assets_list"] = [f"personalities/{self.language}/{self.category}/{self.folder}"
                              f"/assets/{a}" for a in self.assets]
        return out

    def entry(self) -> dict[str, Any]:
        """One /get_all_personalities entry."""
        return {
            "folder": self.folder,
            "name": self.name,
            "description": self.data["personality_description"],
            "author": self.data["author"],
            "version": self.data["version"],
            "has_scripts": self.has_scripts,
            "has_logo": "logo.png" in self.assets or "logo.gif" in self.assets,
            "avatar": self.avatar,
        }
