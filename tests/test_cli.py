"""The `lollms-fast` command, run as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from chatkit import free_port
from lollms_fast import __version__
from lollms_fast.cli import normalise_argv

SCRIPT = Path(sys.executable).parent / "lollms-fast"


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lollms_fast", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}
    env.update(extra)
    return env


def test_argv_defaults_to_serve() -> None:
    assert normalise_argv([]) == ["serve"]
    assert normalise_argv(["--port", "1"]) == ["serve", "--port", "1"]
    assert normalise_argv(["models"]) == ["models"]
    assert normalise_argv(["--help"]) == ["--help"]


def test_version_and_help() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lollms-fast {__version__}"
    assert SCRIPT.exists()
    top = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0
    assert "serve" in top.stdout and "models" in top.stdout
    serve = run("serve", "--help")
    for flag in ("--host", "--port", "--model", "--data-dir", "--db-path", "--n-threads",
                 "--ctx-size", "--parallel"):
        assert flag in serve.stdout


def test_models_lists_the_folder(tmp_path: Path) -> None:
    models = tmp_path / "models" / "llama_cpp"
    models.mkdir(parents=True)
    (models / "mine.gguf").write_bytes(b"GGUF")
    out = run("models", "--data-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 0
    assert "mine.gguf" in out.stdout
    assert "gemma-3-270m-q4_k_m.gguf" in out.stdout  # the embedded default is offered


@pytest.mark.parametrize("content", [None, b"not a model at all", b"GGUF\x03\x00\x00\x00junk"])
def test_missing_or_corrupt_model_is_one_line(tmp_path: Path, content: bytes | None) -> None:
    model = tmp_path / "broken.gguf"
    if content is not None:
        model.write_bytes(content)
    out = run("--data-dir", str(tmp_path), "--model", str(model), "--port", str(free_port()),
              env=clean_env())
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("lollms-fast: error")]
    assert len(errors) == 1 and str(model) in errors[0]
    assert "Traceback" not in out.stderr


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "local_config.yaml").write_text("ctx_size: lots\n", encoding="utf-8")
    out = run("--data-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 2
    assert "ctx_size" in out.stderr and "Traceback" not in out.stderr


def wait_for_config(port: int, proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"server exited early: {err}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_config", timeout=2) as r:
                assert r.headers["Content-Type"].startswith("application/json")
                return orjson.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not answer in time")


@pytest.mark.slow
def test_serve_with_no_model_argument_assembles_default_and_stops_on_sigterm(
        tmp_path: Path, default_model_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(SCRIPT), "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
         "--parallel", "2", "--ctx-size", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        config = wait_for_config(port, proc)
        assert config["port"] == port and config["model"] == "gemma-3-270m-q4_k_m.gguf"
        assembled = tmp_path / "models" / "llama_cpp" / "gemma-3-270m-q4_k_m.gguf"
        assert assembled.stat().st_size == default_model_path.stat().st_size
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert "assembling default model" in stderr and "100%" in stderr
    assert f"http://127.0.0.1:{port}/" in stderr  # the banner
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", ["not sqlite", "too new"])
def test_unusable_database_is_one_line(tmp_path: Path, default_model_path: Path,
                                       kind: str) -> None:
    """A corrupt database, or one written by a newer server, stops the start with one line."""
    import sqlite3

    db = tmp_path / "databases" / "database.db"
    db.parent.mkdir(parents=True)
    if kind == "not sqlite":
        db.write_bytes(b"this is not a database file at all" * 200)
    else:
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1, 999)")
        conn.commit()
        conn.close()
    out = run("--data-dir", str(tmp_path), "--model", str(default_model_path), "--port",
              str(free_port()), env=clean_env())
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("lollms-fast: error")]
    assert len(errors) == 1 and "database" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_sigterm_with_a_connected_socket_exits_promptly(tmp_path: Path,
                                                        default_model_path: Path) -> None:
    """Shutdown disconnects Socket.IO clients itself; it used to wait for each WebSocket's
    ping timeout (75 s). The bound below is a hang guard far under that, not a timing test."""
    import asyncio
    import signal

    import socketio

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lollms_fast", "--data-dir", str(tmp_path), "--model",
         str(default_model_path), "--port", str(port), "--host", "127.0.0.1",
         "--parallel", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for_config(port, proc)

        async def connect_then_stop() -> None:
            client = socketio.AsyncClient(reconnection=False)
            await client.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 40)
            await client.disconnect()

        asyncio.run(connect_then_stop())
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
