"""Configuration: defaults, precedence, validation, unknown keys, atomic saves."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lollms_fast.config import (
    SETTINGS,
    Config,
    ConfigError,
    load_config,
    reload_keys,
    validate,
)
from lollms_fast.errors import BadRequest

REPO = Path(__file__).resolve().parent.parent

# the key set of the seed document's /get_config example
SEED_KEYS = {
    "auto_read", "binding", "config", "ctx_size", "db_path", "debug", "host", "language",
    "model", "n_predict", "n_threads", "nb_messages_to_remember",
    "override_personality_model_parameters", "personality", "personality_category", "port",
    "repeat_last_n", "repeat_penalty", "seed", "temperature", "top_k", "top_p", "use_avx2",
    "use_gpu", "use_new_ui", "version", "voice",
}


def test_defaults_carry_the_seed_keys(tmp_path: Path) -> None:
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    d = cfg.to_dict()
    assert SEED_KEYS <= d.keys()
    assert d["port"] == 9600 and d["host"] == "localhost"
    assert d["personality"] == "lollms" and d["personality_language"] == "english"
    assert d["n_threads"] >= 1
    assert d["seed"] == -1


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    (tmp_path / "local_config.yaml").write_text(
        "port: 7000\nctx_size: 4096\ntemperature: 0.5\n", encoding="utf-8")
    env = {"LOLLMS_PORT": "7100", "LOLLMS_CTX_SIZE": "3000"}
    cfg = load_config({"data_dir": str(tmp_path), "port": 7200}, environ=env)
    assert cfg.port == 7200          # flag
    assert cfg.ctx_size == 3000      # env over file
    assert cfg.temperature == 0.5    # file over default
    assert cfg.top_k == 50           # default


def test_data_dir_from_env_and_not_from_file(tmp_path: Path) -> None:
    (tmp_path / "local_config.yaml").write_text("data_dir: /elsewhere\n", encoding="utf-8")
    cfg = load_config({}, environ={"LOLLMS_DATA_DIR": str(tmp_path)})
    assert cfg.data_dir == str(tmp_path)


@pytest.mark.parametrize("text, needle", [
    ("port: [1, 2\n", "not valid YAML"),
    ("- a list\n", "mapping"),
    ("port: 99999\n", "port"),
    ("temperature: hot\n", "temperature"),
])
def test_bad_file_is_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "local_config.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=needle):
        load_config({"data_dir": str(tmp_path)}, environ={})


def test_bad_env_value_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment"):
        load_config({"data_dir": str(tmp_path)}, environ={"LOLLMS_TOP_P": "2"})


@pytest.mark.parametrize("name, raw, expected", [
    ("override_personality_model_parameters", "false", False),
    ("override_personality_model_parameters", "0", False),
    ("override_personality_model_parameters", "true", True),
    ("override_personality_model_parameters", 1, True),
    ("top_k", "40", 40),
    ("top_k", 40.0, 40),
    ("temperature", "0.7", 0.7),
    ("temperature", 1, 1.0),
    ("model", "x.gguf", "x.gguf"),
])
def test_validate_converts(name: str, raw: object, expected: object) -> None:
    assert validate(name, raw) == expected


@pytest.mark.parametrize("name, raw", [
    ("top_k", "forty"), ("top_k", True), ("top_k", 4.5), ("top_k", -1),
    ("temperature", "nan"), ("temperature", float("inf")), ("temperature", None),
    ("top_p", 1.5), ("binding", "gpt_4all"), ("model", ["a"]),
    ("override_personality_model_parameters", "maybe"), ("no_such_setting", 1),
])
def test_validate_refuses(name: str, raw: object) -> None:
    with pytest.raises(BadRequest):
        validate(name, raw)


def test_updated_is_all_or_nothing(tmp_path: Path) -> None:
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    with pytest.raises(BadRequest):
        cfg.updated({"top_k": 10, "top_p": 7})
    assert cfg.top_k == 50
    new = cfg.updated({"top_k": "10"})
    assert new.top_k == 10 and cfg.top_k == 50
    assert reload_keys(cfg, new) == []
    assert reload_keys(cfg, cfg.updated({"ctx_size": 4096})) == ["ctx_size"]


def test_save_keeps_unknown_keys_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "local_config.yaml"
    path.write_text("my_plugin_setting: 42\ntop_k: 12\n", encoding="utf-8")
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    assert cfg.extra == {"my_plugin_setting": 42}
    assert cfg.to_dict()["my_plugin_setting"] == 42
    cfg.updated({"temperature": 0.3}).save()
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["my_plugin_setting"] == 42
    assert saved["temperature"] == 0.3 and saved["top_k"] == 12
    assert "data_dir" not in saved
    assert [p.name for p in tmp_path.iterdir()] == ["local_config.yaml"]  # no temp files left
    # and it reads back to the same effective settings
    again = load_config({"data_dir": str(tmp_path)}, environ={})
    assert again.to_dict() == cfg.updated({"temperature": 0.3}).to_dict()


class _DiskFullHalfway:
    """A file whose write stores the first half of the text, then fails (disk full)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, data: Any) -> int:
        self._real.write(data[: len(data) // 2])
        self._real.flush()
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _DiskFullHalfway:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()


def test_a_save_that_fails_midway_leaves_the_old_file_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Atomic": whatever the writer does, a crash in the middle of writing (here the disk
    fills up after half the text) leaves readers the old, complete file, and no debris."""
    path = tmp_path / "local_config.yaml"
    old_text = "my_plugin_setting: 42\ntop_k: 12\n" + "".join(
        f"plugin_key_{i}: {'v' * 40}\n" for i in range(200))  # big enough to cut in half
    path.write_text(old_text, encoding="utf-8")
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    changed = cfg.updated({"temperature": 0.3, "top_k": 7})

    real_open, real_fdopen = builtins.open, os.fdopen

    def failing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return _DiskFullHalfway(f) if any(m in mode for m in "wax+") else f

    def failing_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, mode, *args, **kwargs)
        return _DiskFullHalfway(f) if any(m in mode for m in "wax+") else f

    with monkeypatch.context() as patch:  # every way Python opens a file for writing
        patch.setattr(builtins, "open", failing_open)
        patch.setattr(io, "open", failing_open)
        patch.setattr(os, "fdopen", failing_fdopen)
        with pytest.raises(OSError):
            changed.save()
    assert path.read_text(encoding="utf-8") == old_text  # the old file, every byte of it
    assert [p.name for p in tmp_path.iterdir()] == ["local_config.yaml"]
    again = load_config({"data_dir": str(tmp_path)}, environ={})
    assert again.top_k == 12 and again.extra["plugin_key_199"] == "v" * 40
    # and once the disk has room again, the save goes through
    changed.save()
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["top_k"] == 7


def test_secret_is_masked(tmp_path: Path) -> None:
    cfg = load_config({"data_dir": str(tmp_path)}, environ={"LOLLMS_API_KEY": "s3cret"})
    assert cfg.api_key == "s3cret"
    assert cfg.to_dict()["api_key"] == "********"
    assert "s3cret" not in repr(cfg.to_dict())


def test_paths_derive_from_data_dir(tmp_path: Path) -> None:
    cfg: Config = load_config({"data_dir": str(tmp_path)}, environ={})
    assert cfg.models_dir == tmp_path / "models" / "llama_cpp"
    assert cfg.database_path == tmp_path / "databases" / "database.db"
    assert cfg.config_path == tmp_path / "local_config.yaml"


def test_every_setting_is_documented() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M))
    assert documented == {s.name for s in SETTINGS}


def test_save_keeps_flags_and_environment_out_of_the_file(tmp_path: Path) -> None:
    """A flag or environment value is this run's: saving writes the file's own value for
    it (or nothing), unless it was changed since, so a replica's --port or a db_url with a
    password given by the environment never lands in the (shared) file."""
    (tmp_path / "local_config.yaml").write_text("ctx_size: 4096\ntop_k: 7\n", encoding="utf-8")
    secret_url = "postgresql://lollms:pw-in-env@db.internal/lollms"
    cfg = load_config({"data_dir": str(tmp_path), "port": 9702, "ctx_size": 1024},
                      environ={"LOLLMS_DB_URL": secret_url})
    assert (cfg.port, cfg.ctx_size, cfg.db_url) == (9702, 1024, secret_url)
    saved = yaml.safe_load(cfg.save().read_text(encoding="utf-8"))
    assert saved["ctx_size"] == 4096 and saved["top_k"] == 7
    assert "port" not in saved and "db_url" not in saved
    assert "pw-in-env" not in (tmp_path / "local_config.yaml").read_text(encoding="utf-8")
    changed = cfg.updated({"ctx_size": 512, "top_k": 9})  # changed through the API: saved
    saved = yaml.safe_load(changed.save().read_text(encoding="utf-8"))
    assert saved["ctx_size"] == 512 and saved["top_k"] == 9 and "port" not in saved
    again = load_config({"data_dir": str(tmp_path)}, environ={})
    assert (again.ctx_size, again.port, again.db_url) == (512, 9600, "")
