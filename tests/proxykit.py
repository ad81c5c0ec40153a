"""Real nginx for the replica tests: the shipped deploy/nginx.conf, with only its listen port
and its upstream `server` lines changed, inside a minimal main configuration in a temporary
folder (Debian's `nginx` package, installed like the other servers of servicekit.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from servicekit import _Server, _wait, need_tool

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "deploy" / "nginx.conf"
UPSTREAM_HEADER = "X-Test-Upstream"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


def render_site(text: str, listen: int, upstreams: Sequence[int]) -> str:
    """deploy/nginx.conf for this run: its `listen` port, and in each `upstream` block its
    `server 127.0.0.1:PORT ...;` lines replaced by one line per port (same parameters as
    the block's first line); nothing else touched."""
    line = re.compile(r"^(\s*server\s+127\.0\.0\.1:)\d+\b(.*)$")
    out: list[str] = []
    block: list[re.Match[str]] = []

    def flush() -> None:
        if block:
            head = block[0]
            out.extend(f"{head.group(1)}{port}{head.group(2)}" for port in upstreams)
            block.clear()

    for raw in text.splitlines():
        found = line.match(raw)
        if found:
            block.append(found)
            continue
        flush()
        out.append(raw)
    flush()
    text = "\n".join(out) + "\n"
    assert re.search(r"^\s*server\s+127\.0\.0\.1:", text, flags=re.M), "no upstream servers"
    text, n = re.subn(r"(^\s*listen\s+)(?:[\d.]+:)?\d+", rf"\g<1>127.0.0.1:{listen}", text,
                      count=1, flags=re.M)
    assert n == 1, "deploy/nginx.conf has no listen line"
    return text


def main_config(prefix: Path, site: Path, port_header: bool) -> str:
    """A minimal nginx.conf around the site file: everything under `prefix`, one worker, and
    (for the tests only) a response header naming the replica that answered."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    header = f"    add_header {UPSTREAM_HEADER} $upstream_addr always;\n" if port_header else ""
    return (f"{user}worker_processes 1;\ndaemon off;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"    access_log off;\n{temp}\n{header}"
            f"    include {site};\n"
            "}\n")


class NginxServer(_Server):
    """nginx serving deploy/nginx.conf on a free loopback port in front of `upstreams`."""

    def __init__(self, upstreams: Sequence[int], listen: int, *,
                 port_header: bool = True) -> None:
        self.binary = need_tool(find_nginx, ["nginx"])
        self.upstreams = list(upstreams)
        self.port = listen
        self.port_header = port_header
        self.dir = Path()
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        self.dir = Path(tempfile.mkdtemp(prefix="lollms-nginx-"))
        site = self.dir / "site.conf"
        site.write_text(render_site(SITE.read_text(encoding="utf-8"), self.port,
                                    self.upstreams), encoding="utf-8")
        conf = self.dir / "nginx.conf"
        conf.write_text(main_config(self.dir, site, self.port_header), encoding="utf-8")
        return conf

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the configuration (written first if needed)."""
        conf = self.dir / "nginx.conf" if self.dir.name else self.write_config()
        return subprocess.run([self.binary, "-t", *self._paths(conf)],
                              capture_output=True, text=True)

    def _paths(self, conf: Path) -> list[str]:
        # -e: nginx opens its error log before it reads the configuration
        return ["-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(conf)]

    def start(self) -> None:
        conf = self.write_config()
        log = (self.dir / "stderr").open("wb")
        self._proc = subprocess.Popen([self.binary, *self._paths(conf)],
                                      stdout=log, stderr=subprocess.STDOUT)
        _wait(self._answers, "nginx")
        self.url = f"http://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError("nginx exited: " + self.errors())
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def errors(self) -> str:
        out = ""
        for name in ("stderr", "error.log"):
            path = self.dir / name
            if path.exists():
                out += path.read_text(errors="replace")[-3000:]
        return out

