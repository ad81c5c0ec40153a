"""Model files: listing, header checks, and assembling the embedded default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lollms_fast.config import DEFAULT_MODEL_FILE
from lollms_fast.errors import ModelLoadError
from lollms_fast.modelfiles import (
    assemble_default_model,
    check_model_file,
    ensure_default_model,
    list_models,
    resolve_model,
    verify_default_model,
)


def test_list_models(tmp_path: Path) -> None:
    assert list_models(tmp_path / "missing") == []
    for name in ("b.gguf", "a.GGUF", "legacy.bin", "notes.txt", ".hidden.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    (tmp_path / "dir.gguf").mkdir()
    assert list_models(tmp_path) == ["a.GGUF", "b.gguf", "legacy.bin"]


def test_check_model_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found: .*nope.gguf"):
        check_model_file(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="bad header.*bad.gguf"):
        check_model_file(bad)
    old = tmp_path / "old.bin"
    old.write_bytes(b"ggjt")
    with pytest.raises(ModelLoadError, match="legacy GGML"):
        check_model_file(old)


def test_assemble_verifies_and_reports_progress(tmp_path: Path,
                                                default_model_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    out = assemble_default_model(tmp_path / DEFAULT_MODEL_FILE,
                                 progress=lambda d, t: seen.append((d, t)))
    assert out.stat().st_size == default_model_path.stat().st_size
    assert verify_default_model(out)
    assert seen and seen[-1][0] == seen[-1][1] == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_FILE]  # no temp file left


@pytest.mark.usefixtures("default_model_path")  # the package's chunks are installed
def test_resolve_default_assembles_once_and_reuses(tmp_path: Path) -> None:
    models = tmp_path / "models"
    first = resolve_model(DEFAULT_MODEL_FILE, models, DEFAULT_MODEL_FILE)
    mtime = first.stat().st_mtime_ns
    again = ensure_default_model(models)
    assert again == first and again.stat().st_mtime_ns == mtime


@pytest.mark.usefixtures("default_model_path")
def test_resolve_truncated_default_is_reassembled(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / DEFAULT_MODEL_FILE).write_bytes(b"GGUF" + b"\x00" * 10)
    path = ensure_default_model(models)
    assert verify_default_model(path)


def test_resolve_paths_and_names(tmp_path: Path) -> None:
    other = tmp_path / "models" / "other.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_model("other.gguf", other.parent, DEFAULT_MODEL_FILE) == other
    assert resolve_model(str(other), tmp_path / "elsewhere", DEFAULT_MODEL_FILE) == other
    with pytest.raises(ModelLoadError, match="missing.gguf"):
        resolve_model("missing.gguf", other.parent, DEFAULT_MODEL_FILE)
