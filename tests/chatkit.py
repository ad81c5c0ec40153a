"""Helpers for tests that talk to a live server the way a browser does: an HTTP session
whose cookie the Socket.IO connection shares, and a recorder of the events it receives."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import socketio


def free_port() -> int:
    """A loopback port nothing listens on, for a server started as a child process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EVENTS = ("infos", "message", "final", "update_setting", "save_settings")


@dataclass
class Browser:
    """One client: an HTTP session (cookie jar) plus a Socket.IO connection sharing it."""

    base: str
    http: aiohttp.ClientSession
    sio: socketio.AsyncClient
    events: list[tuple[str, Any]] = field(default_factory=list)
    finals: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    first_message: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def open(cls, base: str, *, delta: bool = False, auth: dict[str, Any] | None = None,
                   transports: list[str] | None = None, api_key: str | None = None
                   ) -> Browser:
        """`delta`: ask for delta mode with the query parameter; `auth`: the Socket.IO
        connect payload; `transports`: ["websocket"] unless given (e.g. ["polling"]);
        `api_key`: sent on every HTTP request and in the connect payload."""
        # unsafe=True: keep cookies from an IP host (the test server is on 127.0.0.1)
        http = aiohttp.ClientSession(base_url=base, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers={"X-API-Key": api_key} if api_key else None)
        if api_key:
            auth = {**(auth or {}), "api_key": api_key}
        async with http.get("/get_generation_status") as resp:  # sets the session cookie
            assert resp.status == 200
        cookie = "; ".join(f"{c.key}={c.value}" for c in http.cookie_jar)
        assert cookie, "the server set no session cookie"
        sio = socketio.AsyncClient(reconnection=False)
        browser = cls(base, http, sio)
        for name in EVENTS:
            sio.on(name, browser._recorder(name))
        url = base + ("?stream=delta" if delta else "")
        await sio.connect(url, headers={"Cookie": cookie}, auth=auth,
                          transports=transports or ["websocket"], wait_timeout=10)
        return browser

    def _recorder(self, name: str) -> Any:
        async def record(data: Any = None) -> None:
            self.events.append((name, data))
            if name == "message":
                self.first_message.set()
            if name == "final":
                await self.finals.put(data)
        return record

    async def generate(self, prompt: str, *, timeout: float = 120) -> dict[str, Any]:
        await self.sio.emit("generate_msg", {"prompt": prompt})
        return await asyncio.wait_for(self.finals.get(), timeout)

    async def regenerate(self, message_id: int, *, timeout: float = 120) -> dict[str, Any]:
        await self.sio.emit("generate_msg_from", {"id": message_id, "prompt": ""})
        return await asyncio.wait_for(self.finals.get(), timeout)

    def of_run(self, final: dict[str, Any]) -> list[tuple[str, Any]]:
        """The events of the generation that ended with `final` (infos .. final)."""
        end = next(i for i, (n, d) in enumerate(self.events) if n == "final" and d is final)
        start = max((i for i, (n, d) in enumerate(self.events[:end])
                     if n == "infos" and d.get("ai_message_id") == final["ai_message_id"]),
                    default=end)
        return self.events[start:end + 1]

    async def get(self, path: str, **params: Any) -> Any:
        async with self.http.get(path, params=params) as resp:
            return resp.status, await resp.json()

    async def post(self, path: str, body: Any) -> Any:
        async with self.http.post(path, json=body) as resp:
            return resp.status, await resp.json()

    async def messages(self, discussion_id: int) -> list[dict[str, Any]]:
        status, body = await self.post("/load_discussion", {"id": discussion_id})
        assert status == 200, body
        return body

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()
        await self.http.close()


# A personality under which the real default model, greedy and without a repeat penalty,
# counts on ("13, 14, 15, ...") until n_predict: an answer that cannot end early, for tests
# that must tell a stop or a cancel from a natural end. Use it with the config
# `personality: counter`, `temperature: 0`, `repeat_penalty: 1.0` and the override on.
COUNTER_PERSONALITY = """\
name: counter
personality_conditioning: "Numbers, counted one by one, separated by commas.\\n"
user_message_prefix: "Task: "
ai_message_prefix: "Answer: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
link_text: "\\n"
anti_prompts: ["Task:"]
"""
COUNTER_SETTINGS = {"personality": "counter", "temperature": 0.0, "repeat_penalty": 1.0,
                    "override_personality_model_parameters": True}
COUNT_PROMPT = "Count from 1 to 1000."


def install_counter_personality(data_dir: Path) -> None:
    folder = data_dir / "personalities" / "english" / "general" / "counter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(COUNTER_PERSONALITY, encoding="utf-8")


@dataclass
class ServerProcess:
    """A server started by `spawn_server`: its URL and its process (for signals)."""

    base: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Any

    def output(self, limit: int | None = 4000) -> str:
        """What it has logged so far (the last `limit` characters; all with None)."""
        self.log.seek(0)
        text = str(self.log.read().decode(errors="replace"))
        return text if limit is None else text[-limit:]


@contextmanager
def spawn_server(data_dir: Path, model: Path, *args: str, timeout: float = 120,
                 env: dict[str, str] | None = None, port: int | None = None
                 ) -> Iterator[ServerProcess]:
    """`python -m lollms_fast serve` as a child process on a loopback port (a free one
    unless given), with no LOLLMS_* variable of the test's environment (only those of
    `env`); yields once `/health` says the model is loaded, and kills it at the end.
    `args`: more serve flags. Its log goes to a temporary file (a pipe nobody reads could
    fill up and block it), shown if it fails to start."""
    port = port or free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")},
           **(env or {})}
    cmd = [sys.executable, "-m", "lollms_fast", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data_dir), "--model", str(model), *args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"the server exited with status {proc.returncode}:"
                                         f"\n{server.output()}")
                try:
                    with urllib.request.urlopen(server.base + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:  # refused, or 503 while the model loads (HTTPError)
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start within {timeout} s:\n"
                                         f"{server.output()}")
                time.sleep(0.2)
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextmanager
def server_process(data_dir: Path, model: Path, *args: str, timeout: float = 120,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """`spawn_server`, yielding only its base URL."""
    with spawn_server(data_dir, model, *args, timeout=timeout, env=env) as server:
        yield server.base


def gemma_chat(*turns: str) -> str:
    """Gemma's chat layout: user, model, user, ... ending where the model answers (the
    grammar tests and benchmarks/bench_grammar.py prompt the raw model with it)."""
    out = []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "model"
        out.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"
