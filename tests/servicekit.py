"""Real servers for the tests, started on loopback in temporary folders: PostgreSQL and Redis.

Each comes from Debian's packages. `need_tool` finds a program, installs its package with
apt-get when it is missing and the tests run as root (CI), and otherwise skips the test
(fails it when CI is set, so CI never goes green by skipping). Nothing else is downloaded.

Every server has the same small face: `start()` / `stop()`, `.url`, and `with Server() as s:`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest

from chatkit import free_port

T = TypeVar("T")


# ---------------------------------------------------------------- Debian packages


def apt_install(packages: list[str]) -> None:
    """`apt-get install` (after an `apt-get update` if the first try fails)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def need_tool(find: Callable[[], T | None], packages: list[str]) -> T:
    """What `find` finds, installing `packages` first if needed and possible; skips the test
    (fails it under CI) when it is still missing."""
    found = find()
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        apt_install(packages)
        found = find()
    if found is None:
        message = f"needs {', '.join(packages)}: sudo apt-get install {' '.join(packages)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _wait(ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


class _Server:
    """A server process of ours in a temp folder: `stop` ends the process (SIGTERM, then
    SIGKILL after 10 s) and removes the folder."""

    url: str
    dir: Path = Path()
    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.dir.name:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = Path()

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_S = TypeVar("_S", bound=_Server)


# ---------------------------------------------------------------- PostgreSQL


def find_postgres() -> Path | None:
    """The bin folder of the newest installed PostgreSQL (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PostgresServer(_Server):
    """A throwaway cluster: initdb in a temp folder (fsync off), listening on 127.0.0.1 on a
    free port and on a unix socket in that folder. Password authentication over TCP for
    `user` (so tests can try a wrong one), trust on the socket for the admin helpers.
    PostgreSQL refuses to run as root: as root it runs as the Debian `postgres` user."""

    user = "lollms"
    password = "s3cret-pw"

    def __init__(self) -> None:
        self.bin = need_tool(find_postgres, ["postgresql"])
        self.port = 0
        self.dir = Path()
        self.url = ""

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=check,
                              cwd=self.dir)

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lollms-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync")
        pwfile.unlink()
        self.port = free_port()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 200\n")
        self.resume()
        self.url = (f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                    f"postgres")

    def resume(self) -> None:
        """Start the (already initialised) server again after `pause`."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.dir / "log"), "-o", "-c log_min_messages=fatal", "start")

    def pause(self) -> None:
        """Stop the server (fast: open connections are cut), keeping its data."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop",
                  check=False)

    def stop(self) -> None:
        if self.dir.name:
            self.pause()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = Path()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the admin over the unix socket; returns psql's unaligned output."""
        done = self._run(str(self.bin / "psql"), "-h", str(self.dir), "-p", str(self.port),
                         "-U", self.user, "-d", database, "-X", "-A", "-t",
                         "-v", "ON_ERROR_STOP=1", "-c", sql)
        return done.stdout.strip()

    def url_for(self, database: str, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)


# ---------------------------------------------------------------- Redis


def _find_redis() -> str | None:
    return shutil.which("redis-server")


class RedisServer(_Server):
    """redis-server on a free loopback port, no persistence, in a temp folder."""

    def __init__(self) -> None:
        self.binary = need_tool(_find_redis, ["redis-server"])
        self.port = 0
        self.dir = Path()
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lollms-redis-"))
        self.port = free_port()
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self._answers, "redis-server")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False
