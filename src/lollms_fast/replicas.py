"""`lollms-fast serve --replicas N`: N server processes on consecutive ports of one machine.

A convenience for trying the replica layout (docs/deployment.md), not a process manager: a
replica that dies is reported and not restarted (a crash at start-up would restart in a
loop; systemd's Restart=on-failure, with its rate limit, is the tool for that), and nothing
here spreads clients over the replicas (that is the proxy's job).

- Each replica is `python -m lollms_fast serve` with the supervisor's own serve flags and
  environment, its own `--port` (port, port + 1, ...) and its own KV disk folder
  (`kv_cache_dir`/<port>: the disk tier's budget and eviction are per process).
- The first replica starts alone; the others start once it listens. By then it has migrated
  the database, assembled the default model if it was missing and hashed it, so the others
  find that work done instead of racing to do it.
- SIGINT / SIGTERM: every replica gets SIGTERM (its graceful shutdown) and is waited for,
  STOP_TIMEOUT_S at most, then killed. A second signal kills them at once. Replicas run in a
  session of their own, so a Ctrl-C in the terminal reaches them only through the
  supervisor (one signal each, never two), and on Linux they get SIGTERM if the supervisor
  itself is killed.
- Exit status: 0 when every replica ended with 0, 1 when one failed (killed, crashed, or
  could not start), 2 when the layout itself is refused (port 0, ports past 65535).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .config import Config, ConfigError

# what the graceful shutdown of one replica may take (aiohttp's 3 s for open requests,
# running answers saved as cancelled, KV states being written flushed) before it is killed
STOP_TIMEOUT_S = 30.0
# how long the first replica may take to listen (loading, or first assembling, the model)
FIRST_START_TIMEOUT_S = 300.0
POLL_S = 0.1

# serve options outside SERVE_FLAGS (cli.py): (flag, namespace key, takes a value)
EXTRA_SERVE_OPTIONS: tuple[tuple[str, str, bool], ...] = (
    ("--api-key-file", "api_key_file", True),
    ("--debug", "debug", False),
    ("--access-log", "access_log", False),
)
# chosen per replica, never copied from the supervisor's command line
PER_REPLICA = frozenset({"port", "replicas"})


@dataclass
class Replica:
    number: int  # 1-based, for messages
    port: int
    kv_cache_dir: str
    process: subprocess.Popen[bytes] | None = None
    listening: bool = False
    status: int | None = None  # exit status once it ended
    expected_exit: bool = False  # it was told to stop


def child_argv(args: argparse.Namespace,
               serve_flags: Iterable[tuple[str, str, Any, str]]) -> list[str]:
    """The serve options given to the supervisor, as a replica's command line (rebuilt from
    the parsed values: abbreviations and `--flag=value` forms need no special case)."""
    argv: list[str] = []
    options = [(flag, key, True) for flag, key, _kind, _help in serve_flags]
    for flag, key, takes_value in (*options, *EXTRA_SERVE_OPTIONS):
        value = getattr(args, key, None)
        if key in PER_REPLICA or value is None:
            continue
        argv += [flag, str(value)] if takes_value else [flag]
    return argv


def plan(config: Config, count: int) -> list[Replica]:
    """The replicas of `config` (ConfigError if the layout cannot work)."""
    if count < 1:
        raise ConfigError(f"--replicas must be at least 1, got {count}")
    if config.port == 0:
        raise ConfigError("--replicas needs a fixed first port (replicas listen on port, "
                          "port + 1, ...; the proxy in front must know them): port 0 picks a "
                          "random one")
    last = config.port + count - 1
    if last > 65535:
        raise ConfigError(f"{count} replicas from port {config.port} would need ports up to "
                          f"{last} (the last is 65535)")
    return [Replica(i + 1, config.port + i, str(Path(config.kv_cache_dir) / str(config.port + i)))
            for i in range(count)]


def shared_state_warnings(config: Config, count: int) -> list[str]:
    """What does not cross replicas with this configuration."""
    out: list[str] = []
    if not config.database_url.startswith(("postgresql://", "postgres://")):
        out.append(
            f"discussions are in one SQLite file shared by the {count} processes "
            f"({config.database_path if not config.db_url else config.db_url}): fine on one "
            "machine (WAL mode, each write waits its turn with busy_timeout), impossible "
            "across machines or on a network file system; use db_url: postgresql://... there")
    if not config.socketio_redis_url:
        out.append(
            "socketio_redis_url is empty: each replica keeps its own browser sessions, "
            "Socket.IO rooms and settings, so a browser must stay on one replica (a sticky "
            "proxy), stop_gen reaches only the replica generating the answer, and "
            "update_setting changes only the replica that received it")
    return out


def url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


def probe_host(host: str) -> str:
    """Where to connect to see whether a replica bound to `host` listens."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if bare == "::":
        return "::1"
    return bare


def is_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}"
    return f"exit status {status}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    """Linux: SIGTERM this replica if the supervisor dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Starts, watches and stops the replicas; `run()` returns the exit status."""

    def __init__(self, config: Config, replicas: Sequence[Replica], serve_argv: Sequence[str],
                 *, environ: Mapping[str, str] | None = None, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.config = config
        self.replicas = list(replicas)
        self.serve_argv = list(serve_argv)
        self.environ = dict(os.environ if environ is None else environ)
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.host = probe_host(config.host)
        self.signals = 0  # SIGINT/SIGTERM received so far

    # ------------------------------------------------------------------ messages

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(f"lollms-fast replicas: {text}", file=self.err, flush=True)

    def layout(self) -> None:
        tls = bool(self.config.ssl_certfile)
        self.say(f"lollms-fast: {len(self.replicas)} replicas (supervisor pid {os.getpid()}); "
                 "put a proxy with sticky sessions in front (deploy/nginx.conf)")
        for r in self.replicas:
            folder = Path(r.kv_cache_dir)
            shown = folder if folder.is_absolute() else self.config.data_path / folder
            self.say(f"  replica {r.number}: {url(self.config.host, r.port, tls)}  "
                     f"kv cache {shown}")
        for text in shared_state_warnings(self.config, len(self.replicas)):
            self.warn(f"warning: {text}")

    # ------------------------------------------------------------------ processes

    def command(self, replica: Replica) -> list[str]:
        return [sys.executable, "-m", "lollms_fast", "serve", *self.serve_argv,
                "--port", str(replica.port)]

    def start(self, replica: Replica) -> None:
        env = {**self.environ, "LOLLMS_KV_CACHE_DIR": replica.kv_cache_dir}
        preexec: Callable[[], None] | None = (
            _die_with_parent if sys.platform.startswith("linux") else None)
        replica.process = subprocess.Popen(self.command(replica), env=env,
                                           start_new_session=True, preexec_fn=preexec)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.process is not None and r.status is None]

    def reap(self) -> None:
        """Record the replicas that ended; report those that were not told to."""
        for r in self.alive():
            assert r.process is not None
            status = r.process.poll()
            if status is None:
                if not r.listening and is_listening(self.host, r.port):
                    r.listening = True
                    self.say(f"  replica {r.number} ready on port {r.port}")
                continue
            r.status = status
            if r.expected_exit:
                continue
            where = f"replica {r.number} (port {r.port}, pid {r.process.pid})"
            if not r.listening:
                self.warn(f"{where} could not start: {describe_status(status)} (see its "
                          "log above); not restarted")
            else:
                self.warn(f"{where} stopped: {describe_status(status)}; not restarted "
                          f"({len(self.alive())} replica(s) still serving; the proxy sends its "
                          "clients to the others)")

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.signals += 1

    def stop_all(self, sig: int) -> None:
        for r in self.alive():
            assert r.process is not None
            r.expected_exit = True
            try:
                r.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait_first(self) -> None:
        """Until the first replica listens, ends, or the supervisor is told to stop."""
        first = self.replicas[0]
        deadline = time.monotonic() + FIRST_START_TIMEOUT_S
        while not self.signals and first.status is None and not first.listening:
            if time.monotonic() > deadline:
                self.warn(f"replica 1 is not listening after {FIRST_START_TIMEOUT_S:.0f} s; "
                          "starting the others anyway")
                return
            time.sleep(POLL_S)
            self.reap()

    def run(self) -> int:
        old = {sig: signal.signal(sig, self._on_signal)
               for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        self.layout()
        self.start(self.replicas[0])
        self.wait_first()
        for r in self.replicas[1:]:
            if self.signals:
                break
            self.start(r)
        handled = 0
        stop_deadline: float | None = None
        while self.alive():
            if self.signals > handled:
                handled = self.signals
                if handled == 1:
                    self.say("lollms-fast: stopping the replicas")
                    self.stop_all(signal.SIGTERM)
                    stop_deadline = time.monotonic() + STOP_TIMEOUT_S
                else:
                    self.warn("second signal: killing the replicas")
                    self.stop_all(signal.SIGKILL)
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                self.warn(f"replicas still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: "
                          "killing them")
                self.stop_all(signal.SIGKILL)
                stop_deadline = None
            time.sleep(POLL_S)
            self.reap()
        failed = [r for r in self.replicas if r.status not in (None, 0)]
        for r in failed:
            if r.expected_exit:  # the unexpected ones were reported when they ended
                self.warn(f"replica {r.number} (port {r.port}) ended with "
                          f"{describe_status(r.status or 0)}")
        return 1 if failed else 0


def supervise(config: Config, count: int, serve_argv: Sequence[str]) -> int:
    """`serve --replicas count`: run the replicas until a signal or until all have ended."""
    try:
        replicas = plan(config, count)
    except ConfigError as exc:
        print(f"lollms-fast: error: {exc.message}", file=sys.stderr)
        return 2
    return Supervisor(config, replicas, serve_argv).run()
