"""Build llama.cpp's own C++ `llama-server`, the benchmarks' strongest peer, from the llama.cpp
source vendored in the pinned llama-cpp-python sdist: the same commit as the library our
server and the raw loops run on, and the same CMake settings as that package's build.

llama-cpp-python's CMakeLists (the wrapper around `vendor/llama.cpp`) forces shared libraries,
the common library and LLAMA_CURL=OFF, and leaves every ggml option at its default
(GGML_NATIVE=ON, OpenMP, llamafile, repack); scikit-build-core configures it as Release and
passes `$CMAKE_ARGS` through. Here the vendored tree is configured on its own with those same
settings, plus the server target and without the web UI (its assets would come from the
network; the benchmark never loads it). `$CMAKE_ARGS` is passed through too, so a machine
whose llama-cpp-python was built with, say, `-DGGML_BLAS=ON` builds its peer the same way.

The build is done once and cached outside the repository, keyed by version and settings:
`${XDG_CACHE_HOME:-~/.cache}/lollms_fast/llama-server-<version>-<hash>/bin/llama-server`.
Re-running it prints the path; an interrupted build resumes.

    .venv/bin/python benchmarks/build_llama_server.py               # build if needed; the path
    .venv/bin/python benchmarks/build_llama_server.py --print-path  # the path, or exit 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, pinned in pyproject.toml
PACKAGE = "llama-cpp-python"
JOBS = 2

# What llama-cpp-python's CMakeLists.txt and scikit-build-core set, then what the server needs.
WRAPPER_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_CURL=OFF",
]
SERVER_FLAGS = [
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download from the Hugging Face bucket
]
DONE = ".built"  # written last: its presence means bin/llama-server is complete


def cmake_flags() -> list[str]:
    return WRAPPER_FLAGS + SERVER_FLAGS + shlex.split(os.environ.get("CMAKE_ARGS", ""))


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lollms_fast"


def build_dir(flags: list[str] | None = None) -> Path:
    flags = cmake_flags() if flags is None else flags
    digest = hashlib.sha256("\n".join([VERSION, *flags]).encode()).hexdigest()[:12]
    return cache_root() / f"llama-server-{VERSION}-{digest}"


def binary_path(root: Path | None = None) -> Path:
    return (build_dir() if root is None else root) / "bin" / "llama-server"


def built_path() -> Path | None:
    """The cached binary if a complete build of the current settings exists."""
    root = build_dir()
    binary = binary_path(root)
    return binary if (root / DONE).is_file() and binary.is_file() else None


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _fetch_source(root: Path) -> Path:
    """Unpack the pinned sdist into root/src (once); return its vendored llama.cpp."""
    source = root / "src"
    vendored = source / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        # PyPI through pip (its cache makes a second download free); no other source
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--disable-pip-version-check", "-d", tmp, f"{PACKAGE}=={VERSION}"])
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise SystemExit(f"expected one sdist in {tmp}, found {archives}")
        unpacked = root / "src.partial"
        shutil.rmtree(unpacked, ignore_errors=True)  # left by an interrupted run
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="tar")
        (top,) = unpacked.iterdir()  # llama_cpp_python-<version>/
        top.rename(source)
        unpacked.rmdir()
    return vendored


def build() -> Path:
    flags = cmake_flags()
    root = build_dir(flags)
    root.mkdir(parents=True, exist_ok=True)
    vendored = _fetch_source(root)
    started = time.perf_counter()
    # the build tree is root itself: llama.cpp puts executables and libraries in <build>/bin
    _run(["cmake", "-S", str(vendored), "-B", str(root), *flags])
    _run(["cmake", "--build", str(root), "--config", "Release", "--target", "llama-server",
          "-j", str(JOBS)])
    binary = binary_path(root)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=True)
    report = (version.stdout + version.stderr).strip()
    (root / DONE).write_text(f"{PACKAGE} {VERSION}\n{shlex.join(flags)}\n{report}\n")
    print(f"built in {time.perf_counter() - started:.0f} s: {report}", file=sys.stderr)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-path", action="store_true",
                        help="print the cached binary's path without building (exit 1 if absent)")
    args = parser.parse_args()
    found = built_path()
    if found is None and args.print_path:
        print(f"llama-server {VERSION} is not built yet: run {Path(__file__).name}",
              file=sys.stderr)
        raise SystemExit(1)
    print(found if found is not None else build())


if __name__ == "__main__":
    main()
