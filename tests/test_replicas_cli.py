"""`lollms-fast serve --replicas N` (src/lollms_fast/replicas.py) and deploy/: the supervisor
on the real default model, its refusals, the per-replica KV folder, and deploy/nginx.conf
checked by the real nginx."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import psutil
import pytest

from lollms_fast import replicas
from lollms_fast.cli import SERVE_FLAGS, build_parser, main
from lollms_fast.config import load_config
from lollms_fast.engine.loader import kv_cache_for

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx.conf"
# a hang guard, not a timing threshold: loading a 270M model takes seconds
START_TIMEOUT_S = 120.0


# ---------------------------------------------------------------- refusals and plans


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LOLLMS_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2", "--port", "0"], "port 0"),
    (["--replicas", "3", "--port", "65534"], "65535"),
    (["--replicas", "0", "--port", "9600"], "at least 1"),
])
@pytest.mark.usefixtures("clean_env")
def test_refused_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         argv: list[str], message: str) -> None:
    status = main(["serve", "--data-dir", str(tmp_path), *argv])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("lollms-fast: error:") and message in err


def test_plan_gives_consecutive_ports_and_own_kv_folders(tmp_path: Path) -> None:
    config = load_config({"data_dir": str(tmp_path), "port": 9601}, environ={})
    plan = replicas.plan(config, 3)
    assert [r.port for r in plan] == [9601, 9602, 9603]
    assert [r.kv_cache_dir for r in plan] == [f"kv_cache{os.sep}{p}" for p in (9601, 9602, 9603)]
    absolute = load_config({"data_dir": str(tmp_path), "port": 9601},
                           environ={"LOLLMS_KV_CACHE_DIR": str(tmp_path / "kv")})
    assert replicas.plan(absolute, 1)[0].kv_cache_dir == str(tmp_path / "kv" / "9601")


def test_child_command_line_keeps_every_serve_option() -> None:
    """Every serve option the supervisor was given reaches the replicas (rebuilt from the
    parsed values), except --port and --replicas; a new serve option fails this test until
    child_argv knows it."""
    parser = build_parser()
    handled = {key for _flag, key, _kind, _help in SERVE_FLAGS}
    handled |= {key for _flag, key, _value in replicas.EXTRA_SERVE_OPTIONS}
    assert set(vars(parser.parse_args(["serve"]))) - {"command"} == handled | {"replicas"}

    given = ["serve", "--replicas=2", "--port", "9601", "--host", "0.0.0.0",
             "--n-thr", "1",  # an abbreviation
             "--ctx-size=512", "--parallel", "2", "--api-key-file", "/k", "--debug",
             "--access-log", "--db-url", "postgresql://u@h/d"]
    args = parser.parse_args(given)
    child = replicas.child_argv(args, SERVE_FLAGS)
    assert "--port" not in child and not any(a.startswith("--replicas") for a in child)
    again = parser.parse_args(["serve", *child])
    expected = {**vars(args), "port": None, "replicas": None}
    assert vars(again) == expected


def test_warnings_say_what_does_not_cross_replicas(tmp_path: Path) -> None:
    local = load_config({"data_dir": str(tmp_path)}, environ={})
    texts = replicas.shared_state_warnings(local, 2)
    assert len(texts) == 2
    assert "SQLite" in texts[0] and "socketio_redis_url" in texts[1]
    shared = local.updated({"db_url": "postgresql://lollms@db/lollms",
                            "socketio_redis_url": "redis://cache:6379/0"})
    assert replicas.shared_state_warnings(shared, 2) == []


def test_kv_cache_dir_setting_places_the_disk_tier(tmp_path: Path) -> None:
    """The default folder is unchanged (states stored by earlier versions are found); a
    relative kv_cache_dir is under the data dir, an absolute one is used as it is."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not really a model")
    backend: Any = SimpleNamespace(params=SimpleNamespace(model_path=model),
                                   state_format={"kv": "f16"})
    for value, expected in ((None, tmp_path / "data" / "kv_cache"),
                            ("kv_cache/9601", tmp_path / "data" / "kv_cache" / "9601"),
                            (str(tmp_path / "elsewhere"), tmp_path / "elsewhere")):
        environ = {} if value is None else {"LOLLMS_KV_CACHE_DIR": value}
        config = load_config({"data_dir": str(tmp_path / "data")}, environ=environ)
        assert config.kv_cache_path == expected
        cache = kv_cache_for(config, backend)
        assert cache is not None and cache.directory == expected
        cache.close()
        assert (expected / "model-sha256.json").is_file()
    # not written back by save_settings: a replica's folder never becomes everyone's
    config = load_config({"data_dir": str(tmp_path / "data")},
                         environ={"LOLLMS_KV_CACHE_DIR": "kv_cache/9601"})
    assert "kv_cache_dir" not in config.file_dict()


# ---------------------------------------------------------------- nginx


def test_nginx_conf_is_accepted_by_nginx() -> None:
    from proxykit import NginxServer

    text = NGINX_CONF.read_text(encoding="utf-8")
    assert re.search(r"^\s*listen 8080;$", text, flags=re.M)
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:960[123] .*;$", text, flags=re.M)) >= 3
    nginx = NginxServer([19601, 19602, 19603], 18080, port_header=False)
    try:
        result = nginx.check()  # `nginx -t` on the rendered file inside a minimal main config
    finally:
        nginx.stop()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_conf_says_what_the_tests_and_the_server_rely_on() -> None:
    text = NGINX_CONF.read_text(encoding="utf-8")
    assert re.search(r"hash \$\w+ consistent;", text)
    assert "$cookie_lollms_session" in text and "$remote_addr" in text
    assert "proxy_next_upstream error timeout;" in text
    assert "non_idempotent" in text  # explained, and not enabled:
    assert not re.search(r"^\s*proxy_next_upstream [^#\n]*non_idempotent", text, flags=re.M)
    body, upload = (int(mb) * 1024 * 1024
                    for mb in re.findall(r"client_max_body_size (\d+)m;", text))
    config = load_config({}, environ={})
    assert (body, upload) == (config.max_body_size, config.max_import_size)


# ---------------------------------------------------------------- the supervisor, for real


def free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports nothing listens on."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free consecutive ports")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def healthy(url: str) -> bool:
    try:
        return bool(get_json(url + "/health")["status"] == "ok")
    except OSError:
        return False


@dataclass
class Supervised:
    process: subprocess.Popen[bytes]
    urls: list[str]
    log: IO[bytes]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()


@contextmanager
def supervisor(data_dir: Path, model: Path, count: int) -> Iterator[Supervised]:
    """`lollms-fast serve --replicas count` with small settings, until every replica's
    /health is ok; everything it started is killed at the end."""
    base = free_ports(count)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}
    cmd = [sys.executable, "-m", "lollms_fast", "serve", "--replicas", str(count),
           "--host", "127.0.0.1", "--port", str(base), "--data-dir", str(data_dir),
           "--model", str(model), "--n-threads", "1", "--parallel", "1", "--ctx-size", "512"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        run = Supervised(proc, [f"http://127.0.0.1:{base + i}" for i in range(count)], log)
        pids: set[int] = set()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not all(healthy(u) for u in run.urls):
                assert proc.poll() is None, run.output()
                assert time.monotonic() < deadline, run.output()
                time.sleep(0.2)
            pids = {c.pid for c in run.children()}
            assert len(pids) == count
            yield run
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def stop(run: Supervised) -> int:
    children = run.children()
    run.process.send_signal(signal.SIGTERM)
    status = run.process.wait(timeout=replicas.STOP_TIMEOUT_S + 30)  # a hang guard
    for child in children:
        assert not psutil.pid_exists(child.pid) or \
            child.status() == psutil.STATUS_ZOMBIE, run.output()
    return status


@pytest.mark.slow
def test_two_replicas_share_the_database_and_stop_cleanly(tmp_path: Path,
                                                         default_model_path: Path) -> None:
    with supervisor(tmp_path / "data", default_model_path, 2) as run:
        first, second = run.urls
        created = get_json(first + "/new_discussion?title=made%20on%20the%20first")
        listed = get_json(second + "/list_discussions")
        assert created["id"] in [d["id"] for d in listed]
        assert "made on the first" in [d["title"] for d in listed]
        # each replica has its own KV disk folder
        ports = [u.rsplit(":", 1)[1] for u in run.urls]
        assert {p.name for p in (tmp_path / "data" / "kv_cache").iterdir()} >= set(ports)
        out = run.output()
        assert all(u + "/" in out for u in run.urls)  # the layout names every replica
        assert "SQLite" in out and "socketio_redis_url is empty" in out

        assert stop(run) == 0, run.output()
        assert "stopping the replicas" in run.output()
        assert not healthy(first) and not healthy(second)


@pytest.mark.slow
def test_a_killed_replica_is_reported_and_the_other_keeps_serving(
        tmp_path: Path, default_model_path: Path) -> None:
    with supervisor(tmp_path / "data", default_model_path, 2) as run:
        victim = next(c for c in run.children()
                      if run.urls[1].rsplit(":", 1)[1] in " ".join(c.cmdline()))
        victim.kill()
        deadline = time.monotonic() + START_TIMEOUT_S
        while "killed by SIGKILL" not in run.output():
            assert time.monotonic() < deadline, run.output()
            time.sleep(0.1)
        assert "replica 2" in run.output() and "not restarted" in run.output()
        assert healthy(run.urls[0])
        assert get_json(run.urls[0] + "/list_discussions") == []
        assert run.process.poll() is None  # still supervising the survivor

        assert stop(run) == 1, run.output()  # a replica failed
