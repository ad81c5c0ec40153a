"""The live configuration: validated in-memory changes, engine reloads for the settings that
need one, and atomic saves to local_config.yaml.

`update_setting` / `save_settings` exist both as HTTP routes and as Socket.IO events (SPEC 3);
both call the methods here and send the same reply dict.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    DEFAULT_MODEL_FILE,
    KEPT_ON_RESET,
    SETTINGS,
    SETTINGS_BY_NAME,
    Config,
    reload_keys,
    reset_config,
    validate,
)
from ..errors import BadRequest, LollmsError, NotFound
from ..personalities.loader import safe_name

if TYPE_CHECKING:
    from ..engine.scheduler import Engine
    from ..personalities.loader import PersonalityLibrary
    from .engine_control import EngineControl

log = logging.getLogger("lollms_fast.settings")

# what update_setting may change (SPEC section 3); everything else is refused
UPDATABLE = frozenset({
    "temperature", "top_k", "top_p", "n_predict", "n_threads", "ctx_size", "repeat_penalty",
    "repeat_last_n", "seed", "language", "personality_language", "personality_category",
    "personality", "model", "binding", "override_personality_model_parameters",
    "nb_messages_to_remember",
})
PERSONALITY_KEYS = ("personality_language", "personality_category", "personality")

# the camelCase body of /update_model_params (as the old UI sent it) -> setting names
MODEL_PARAMS = {
    "binding": "binding", "model": "model", "personality_language": "personality_language",
    "personality_category": "personality_category", "personality": "personality",
    "nPredict": "n_predict", "seed": "seed", "voice": "voice", "language": "language",
    "temperature": "temperature", "topK": "top_k", "topP": "top_p",
    "repeatPenalty": "repeat_penalty", "repeatLastN": "repeat_last_n",
}

_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?", re.ASCII)

Reply = dict[str, Any]


class SettingsService:
    """Holds the current (immutable) Config; every change swaps in a new, validated one.

    `library` checks personality choices. `engine` is the engine this service drives: a
    change of an engine-level setting is applied to it, and the new config kept only if the
    engine took it. Both are optional (a bare service only validates and saves)."""

    def __init__(self, config: Config, *, library: PersonalityLibrary | None = None,
                 engine: EngineControl[Engine] | None = None) -> None:
        self._config = config
        self._save_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self.library = library
        self.engine = engine
        # replicas: told of every change applied here and of every save (services/cluster.py
        # publishes them; the other replicas call apply_remote / save)
        self.on_applied: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.on_saved: Callable[[], Awaitable[None]] | None = None

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

    # ------------------------------------------------------------ checked changes

    async def checked(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """`raw` converted and checked against the settings table and the disk (personality
        folders, model files); raises BadRequest / NotFound without changing anything."""
        changes = {name: validate(name, value) for name, value in raw.items()}
        if "language" in changes and not _LANGUAGE_CODE.fullmatch(changes["language"]):
            raise BadRequest(f"language must be a language code like en-US, got "
                             f"{changes['language']!r}")
        if "model" in changes:
            await asyncio.to_thread(self._check_model, changes["model"],
                                    changes.get("binding", self._config.binding))
        picked = {k: changes[k] for k in PERSONALITY_KEYS if k in changes}
        if picked and self.library is not None:
            c = self._config
            current = (c.personality_language, c.personality_category, c.personality)
            lang, cat, folder = await asyncio.to_thread(
                self.library.select, current, picked.get("personality_language"),
                picked.get("personality_category"), picked.get("personality"))
            changes.update(personality_language=lang, personality_category=cat,
                           personality=folder)
        return changes

    def _check_model(self, model: str, binding: str) -> None:
        """A model chosen over the API is a file name in the models folder (never a path: a
        client must not make the server open arbitrary files); the configured one and the
        embedded default (assembled on first use) always pass."""
        if model == self._config.model or model == DEFAULT_MODEL_FILE:
            return
        if not safe_name(model):
            raise BadRequest("model must be a file name from /list_models")
        path = self._config.data_path / "models" / binding / model
        if not path.is_file():
            raise NotFound(f"model {model!r} is not in the models folder")
        if path.suffix.lower() != ".gguf":
            raise BadRequest(f"model {model!r} is not a GGUF file (legacy GGML .bin files "
                             f"are not supported: convert them to GGUF)")

    def _needs_engine(self, changes: Mapping[str, Any]) -> bool:
        """True if `changes` touch an engine-level key and there is an engine to reload (a
        server without one keeps such changes pending, as apply_settings reports)."""
        if self.engine is None or not self.engine.can_load:
            return False
        return bool(reload_keys(self._config, self._config.updated(changes)))

    async def apply_changes(self, changes: Mapping[str, Any], *, share: bool = True
                            ) -> list[str]:
        """Apply checked changes and return the errors. Changes needing a new engine are
        applied one set at a time: the engine is reloaded (off the event loop, the old one
        serving until the new one is loaded) and the config is kept only if that worked.
        Applied changes go to the other replicas unless `share` is false."""
        if not self._needs_engine(changes):
            self.update(changes)
            errors: list[str] = []
        else:
            assert self.engine is not None
            async with self._apply_lock:
                errors = await self.engine.apply(self._config.updated(changes))
                if not errors:
                    # applied on top of the current config: changes made meanwhile are kept
                    self.update(changes)
        if not errors and changes and share and self.on_applied is not None:
            await self.on_applied(dict(changes))
        return errors

    async def apply_remote(self, raw: Mapping[str, Any]) -> list[str]:
        """Changes another replica applied: checked here as if a client sent them (this
        machine's model files and personalities), never those of where the data lives or
        of a secret, and not passed on again."""
        allowed = {k: v for k, v in raw.items()
                   if k in SETTINGS_BY_NAME and k not in KEPT_ON_RESET
                   and not SETTINGS_BY_NAME[k].secret}
        if len(allowed) != len(raw):
            log.warning("ignored settings from another replica: %s",
                        ", ".join(sorted(set(raw) - set(allowed))))
        errors = await self.apply_changes(await self.checked(allowed), share=False)
        if errors:
            log.error("settings from another replica not applied here: %s", "; ".join(errors))
        return errors

    # ------------------------------------------------------------ the lollms operations

    async def update_setting(self, payload: Any) -> tuple[Reply, int]:
        """`update_setting` (SPEC 3): the reply and the HTTP status to send it with."""
        if not isinstance(payload, Mapping):
            return {"setting_name": None, "status": False,
                    "error": "expected an object {setting_name, setting_value}"}, 400
        name = payload.get("setting_name")
        if not isinstance(name, str):
            return {"setting_name": None, "status": False,
                    "error": "field 'setting_name' must be text"}, 400
        if "setting_value" not in payload:
            return {"setting_name": name, "status": False,
                    "error": "field 'setting_value' is required"}, 400
        if name not in UPDATABLE:
            return {"setting_name": name, "status": False,
                    "error": f"unknown or read-only setting {name!r}"}, 400
        try:
            errors = await self.apply_changes(
                await self.checked({name: payload["setting_value"]}))
        except LollmsError as exc:
            return {"setting_name": name, "status": False, "error": exc.message}, exc.status
        if errors:
            return {"setting_name": name, "status": False, "error": "; ".join(errors)}, 200
        return {"setting_name": name, "status": True}, 200

    async def update_setting_reply(self, payload: Any) -> Reply:
        """The Socket.IO face of update_setting (the reply only)."""
        reply, _status = await self.update_setting(payload)
        return reply

    async def save_reply(self) -> Reply:
        try:
            await self.save()
            if self.on_saved is not None:
                await self.on_saved()
        except OSError as exc:
            log.error("cannot save the configuration: %s", exc)
            return {"status": False, "error": f"cannot write the configuration file: "
                                              f"{exc.strerror or exc}"}
        return {"status": True}

    async def apply_pending(self) -> Reply:
        """`apply_settings`: reload the engine for engine-level changes not yet applied."""
        errors: list[str] = []
        pending: list[str] = []
        if self.engine is not None:
            async with self._apply_lock:
                pending = self.engine.pending(self._config)
                errors = await self.engine.apply(self._config)
        failed = set(pending) if errors else set()
        # the per-part booleans the 2023 settings page received
        return {"status": "failed" if errors else "succeeded",
                "binding_status": "binding" not in failed,
                "model_status": not failed, "personality_status": True, "errors": errors}

    async def reset(self) -> Reply:
        """`reset_settings`: every setting back to what this process would start with
        without local_config.yaml (defaults, then the environment and command line); the
        data dir, database, API key and UI dir stay. Applied like apply_settings; not saved.
        """
        target = reset_config(self._config)
        changes = {s.name: getattr(target, s.name) for s in SETTINGS
                   if getattr(target, s.name) != getattr(self._config, s.name)}
        try:
            errors = await self.apply_changes(changes)
        except LollmsError as exc:
            return {"status": False, "error": exc.message}
        if errors:
            return {"status": False, "error": "; ".join(errors)}
        return {"status": True}

    async def change(self, raw: Mapping[str, Any]) -> Reply:
        """`set_binding` / `set_model` / the settings part of `update_model_params`: bad
        values raise (4xx); a failed reload answers `failed` with the config unchanged."""
        errors = await self.apply_changes(await self.checked(raw))
        if errors:
            return {"status": "failed", "error": "; ".join(errors)}
        return {"status": "succeeded"}

    async def update_model_params(self, body: Mapping[str, Any]) -> Reply:
        """The old UI's one-shot form: camelCase keys, applied together, then saved."""
        raw = {MODEL_PARAMS[k]: v for k, v in body.items() if k in MODEL_PARAMS}
        if not raw:
            raise BadRequest("no known parameter in the body (expected some of "
                             + ", ".join(MODEL_PARAMS) + ")")
        reply = await self.change(raw)
        if reply["status"] == "succeeded":
            saved = await self.save_reply()
            if not saved["status"]:
                return {"status": "failed", "error": saved["error"]}
        return reply
