"""Crash safety: the server killed with SIGKILL in the middle of an answer, of a large import
and of settings saves, then restarted on the same data dir.

What must hold after every kill (SPEC 2 and 4, DESIGN "Storage"):
- the SQLite file passes `PRAGMA integrity_check`, both as the kill left it (a copy of the
  database and its WAL, checked before the restart touches it) and after the restart;
- every row written before the kill is there, unchanged;
- a half-streamed answer holds a prefix of what the client saw, at most about one checkpoint
  (a second) behind it;
- an import is one transaction: all of it or none of it, never part;
- `local_config.yaml` is the old file or the new one, never a mix or truncated.

The answers come from the real model through a personality that adds nothing around the
prompt: greedy, it continues "1, 2, 3, ..." for as long as n_predict allows, so an answer
cannot end on its own before the kill. The only timings are generous safety timeouts and
the "about a second" bound, taken as three seconds of the client's own stream.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import socketio
import yaml

from chatkit import free_port

pytestmark = pytest.mark.slow

PERSONALITY = ("english", "crash", "counter")  # language, category, folder
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
LONG_ANSWER = 1800  # tokens; about 30 s on two cores, so never over before the kill
STREAM_BEFORE_KILL_S = 5.0  # several checkpoints (one a second) happen before the kill
CHECKPOINT_SLACK_S = 3.0  # "about a second behind", generously


def write_counter_personality(data_dir: Path) -> None:
    """Empty conditioning, prefixes and link, no anti-prompts, no welcome message: the
    prompt reaches the model as it is."""
    folder = data_dir / "personalities" / Path(*PERSONALITY)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": "counter", "author": "tests", "version": "1.0.0",
        "personality_conditioning": "", "welcome_message": "", "user_message_prefix": "",
        "ai_message_prefix": "", "link_text": "", "anti_prompts": [],
    }), encoding="utf-8")


class Server:
    """`python -m lollms_fast` on a data dir, started and killed by its process id."""

    def __init__(self, data_dir: Path, model: Path, *, counter: bool = False) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "lollms_fast", "--data-dir", str(data_dir),
                    "--model", str(model), "--port", str(self.port), "--host", "127.0.0.1",
                    "--n-threads", "2", "--ctx-size", "2048", "--parallel", "2"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LOLLMS_")}
        if counter:
            language, category, folder = PERSONALITY
            self.env.update({
                "LOLLMS_PERSONALITY_LANGUAGE": language,
                "LOLLMS_PERSONALITY_CATEGORY": category, "LOLLMS_PERSONALITY": folder,
                "LOLLMS_OVERRIDE_PERSONALITY_MODEL_PARAMETERS": "true",
                "LOLLMS_TEMPERATURE": "0", "LOLLMS_REPEAT_PENALTY": "1.0",
            })
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    async def start(self, timeout: float = 120) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited ({self.proc.returncode}):\n"
                                         + self.log.read_text(errors="replace")[-3000:])
                try:
                    async with http.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        self.kill()
        raise AssertionError("the server did not become healthy in time")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


class Client:
    """An HTTP session (its cookie) and, when asked, a Socket.IO connection sharing it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(base_url=url,
                                          cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sio = socketio.AsyncClient(reconnection=False)

    async def get(self, path: str, **params: Any) -> Any:
        async with self.http.get(path, params=params) as resp:
            body = orjson.loads(await resp.read())
            assert resp.status == 200, (path, resp.status, body)
            return body

    async def post(self, path: str, body: Any) -> Any:
        async with self.http.post(path, json=body) as resp:
            data = orjson.loads(await resp.read())
            assert resp.status == 200, (path, resp.status, data)
            return data

    async def post_raw(self, path: str, body: bytes) -> int:
        async with self.http.post(path, data=body,
                                  headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return resp.status

    async def setting(self, name: str, value: Any) -> None:
        reply = await self.post("/update_setting", {"setting_name": name,
                                                    "setting_value": value})
        assert reply["status"] is True, reply

    async def connect(self) -> None:
        await self.get("/get_generation_status")  # sets the session cookie
        cookie = "; ".join(f"{c.key}={c.value}" for c in self.http.cookie_jar)
        await self.sio.connect(self.url, headers={"Cookie": cookie},
                               transports=["websocket"], wait_timeout=20)

    async def close(self) -> None:
        if self.sio.connected:
            try:
                await self.sio.disconnect()
            except Exception:  # the server is gone: nothing to say goodbye to
                pass
        await self.http.close()


def database(data_dir: Path) -> Path:
    return data_dir / "databases" / "database.db"


def snapshot(db: Path, scratch: Path) -> Path:
    """A copy of the database and its WAL exactly as the kill left them (opening the
    original would recover and checkpoint it before the server's restart could)."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / db.name
    for suffix in ("", "-wal"):
        source = Path(str(db) + suffix)
        if source.exists():
            shutil.copyfile(source, Path(str(copy) + suffix))
    return copy


def integrity(db: Path, *, read_only: bool = False) -> str:
    uri = f"file:{db}?mode=ro" if read_only else f"file:{db}"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ mid-answer


async def test_kill_mid_answer_keeps_written_rows_and_a_recent_prefix(
        tmp_path: Path, default_model_path: Path) -> None:
    data = tmp_path / "data"
    write_counter_personality(data)
    server = await Server(data, default_model_path, counter=True).start()
    client = Client(server.url)
    pieces: list[tuple[float, str]] = []  # (arrival, the whole answer so far)
    ids: dict[str, Any] = {}
    finals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_infos(data: Any = None) -> None:
        if isinstance(data, dict) and data.get("status") == "generation_started":
            ids.update(data)

    async def on_message(data: Any = None) -> None:
        if isinstance(data, dict) and data.get("ai_message_id") == ids.get("ai_message_id"):
            pieces.append((time.monotonic(), str(data["data"])))  # compatibility mode

    async def on_final(data: Any = None) -> None:
        await finals.put(data)

    client.sio.on("infos", on_infos)
    client.sio.on("message", on_message)
    client.sio.on("final", on_final)
    try:
        await client.connect()
        discussion = (await client.get("/new_discussion", title="before the crash"))["id"]
        # one complete, short answer first
        await client.setting("n_predict", 24)
        await client.sio.emit("generate_msg", {"prompt": "The capital of France is"})
        first = await asyncio.wait_for(finals.get(), 120)
        assert first["finish_reason"] in ("stop", "length") and first["data"], first
        before = await client.post("/load_discussion", {"id": discussion})
        assert before[-1]["content"] == first["data"]

        # then a long one, killed while it streams
        await client.setting("n_predict", LONG_ANSWER)
        pieces.clear()
        await client.sio.emit("generate_msg", {"prompt": COUNTING})
        deadline = time.monotonic() + 120
        while not pieces or time.monotonic() - pieces[0][0] < STREAM_BEFORE_KILL_S:
            assert time.monotonic() < deadline, "the answer did not stream"
            assert finals.empty(), f"the answer ended before the kill: {finals.get_nowait()}"
            await asyncio.sleep(0.05)
        t_kill = time.monotonic()
        seen = pieces[-1][1]
        server.kill()
    finally:
        await client.close()
        if server.proc is not None and server.proc.poll() is None:
            server.kill()

    # the file exactly as the kill left it
    crashed = snapshot(database(data), tmp_path / "crashed")
    assert integrity(crashed) == "ok"

    restarted = await Server(data, default_model_path, counter=True).start()
    client = Client(restarted.url)
    try:
        assert integrity(database(data), read_only=True) == "ok"
        assert await client.get("/list_discussions") == [
            {"id": discussion, "title": "before the crash"}]
        after = await client.post("/load_discussion", {"id": discussion})
        assert after[:len(before)] == before  # every row written before: unchanged
        user, answer = after[len(before):]
        assert (user["id"], user["content"], user["sender"]) == (
            ids["user_message_id"], COUNTING, "user")
        assert user["parent"] == before[-1]["id"]
        assert answer["id"] == ids["ai_message_id"] and answer["parent"] == user["id"]

        saved = answer["content"]
        assert saved, "no checkpoint reached the database in five seconds of streaming"
        assert seen.startswith(saved), "the saved answer is not what the client saw"
        # at most about one checkpoint behind: at least what the client had a little
        # earlier (the client only ever lags the server, so this bound is safe)
        earlier = [text for t, text in pieces if t <= t_kill - CHECKPOINT_SLACK_S]
        assert earlier, "the stream was too short to judge the checkpoint lag"
        assert len(saved) >= len(earlier[-1]), (len(saved), len(earlier[-1]))
        caught_up = next(t for t, text in pieces if len(text) >= len(saved))
        print(f"\nkilled after {t_kill - pieces[0][0]:.1f} s of streaming: the client had "
              f"{len(seen)} characters, the database {len(saved)} "
              f"({t_kill - caught_up:.2f} s behind the client)")

        # and the discussion goes on, with the partial answer in its history
        await client.connect()
        finals = asyncio.Queue()
        client.sio.on("final", on_final)
        await client.setting("n_predict", 16)
        await client.post("/load_discussion", {"id": discussion})  # select it
        await client.sio.emit("generate_msg", {"prompt": "11, 12, 13,"})
        final = await asyncio.wait_for(finals.get(), 120)
        assert final["finish_reason"] in ("stop", "length") and final["data"], final
        assert final["discussion_id"] == discussion
        grown = await client.post("/load_discussion", {"id": discussion})
        assert grown[:len(after)] == after and len(grown) == len(after) + 2
        assert grown[-1]["content"] == final["data"]
    finally:
        await client.close()
        restarted.stop()


# ------------------------------------------------------------------ mid-import

IMPORT_DISCUSSIONS = 1500
IMPORT_MESSAGES = 60  # per discussion: 90,000 rows, one transaction of tens of MB
WAL_GROWTH = 1 << 20  # the import has spilled this much to the WAL: it is mid-transaction


def import_body(marker: str) -> bytes:
    discussions = []
    for d in range(IMPORT_DISCUSSIONS):
        messages = [{"id": m + 1, "sender": "user" if m % 2 == 0 else "lollms",
                     "content": f"{marker} {d}.{m} " + "lorem ipsum dolor sit amet " * 4,
                     "type": 0, "rank": 0, "parent": m, "created_at": None}
                    for m in range(IMPORT_MESSAGES)]
        discussions.append({"id": d + 1, "title": f"{marker} {d}", "messages": messages})
    return orjson.dumps({"jArray": discussions})


async def test_kill_during_import_leaves_all_or_none(tmp_path: Path,
                                                     default_model_path: Path) -> None:
    """A fresh data dir per attempt (the WAL's size is the sign that the import's one
    transaction is being written); up to three attempts to land a kill inside it."""
    landed_inside = 0
    for attempt in range(3):
        data = tmp_path / f"data{attempt}"
        marker = f"imported-{attempt}"
        body = import_body(marker)
        server = await Server(data, default_model_path).start()
        client = Client(server.url)
        wal = Path(str(database(data)) + "-wal")
        request: asyncio.Future[int] | None = None
        try:
            kept = []
            for i in range(3):
                d = (await client.get("/new_discussion", title=f"kept {i}"))["id"]
                await client.post("/edit_title", {"id": d, "title": f"kept {i}, renamed"})
                kept.append(d)
            exported = await client.post("/export_multiple_discussions",
                                         {"discussion_ids": kept})
            baseline = wal.stat().st_size if wal.exists() else 0
            request = asyncio.ensure_future(client.post_raw("/import_multiple_discussions",
                                                            body))
            deadline = time.monotonic() + 120
            while not request.done() and time.monotonic() < deadline:
                if wal.exists() and wal.stat().st_size > baseline + WAL_GROWTH:
                    break
                await asyncio.sleep(0.002)
            answered = request.done()
            server.kill()
            wal_at_kill = wal.stat().st_size if wal.exists() else 0
            if answered:
                assert request.result() == 200
            landed_inside += not answered
        finally:
            await client.close()
            if request is not None:
                request.cancel()  # no-op once it is done
                await asyncio.gather(request, return_exceptions=True)
            server.kill()

        crashed = snapshot(database(data), tmp_path / f"crashed{attempt}")
        assert integrity(crashed) == "ok"
        restarted = await Server(data, default_model_path).start()
        client = Client(restarted.url)
        try:
            db = database(data)
            assert integrity(db, read_only=True) == "ok"
            assert await client.post("/export_multiple_discussions",
                                     {"discussion_ids": kept}) == exported
            found = rows(db, "SELECT count(*) FROM discussion WHERE title LIKE ?",
                         f"{marker} %")[0][0]
            messages = rows(db, "SELECT count(*) FROM message WHERE content LIKE ?",
                            f"{marker} %")[0][0]
            assert (found, messages) in (
                (0, 0), (IMPORT_DISCUSSIONS, IMPORT_DISCUSSIONS * IMPORT_MESSAGES)), (
                f"part of the import survived: {found} discussions, {messages} messages")
            print(f"\nattempt {attempt}: killed {'after' if answered else 'inside'} the "
                  f"import (WAL {wal_at_kill >> 10} KiB); after the restart {found} of its "
                  f"{IMPORT_DISCUSSIONS} discussions are there")
            # the server takes imports again
            small = await client.post("/import_multiple_discussions", {"jArray": [
                {"title": "after", "messages": [{"sender": "user", "content": "hi"}]}]})
            assert len(small["ids"]) == 1
        finally:
            await client.close()
            restarted.stop()
        if landed_inside:
            break
    assert landed_inside, "no kill landed inside the import's transaction in 3 attempts"


# ------------------------------------------------------------------ mid-save

# each save writes this much (an unknown key the file keeps): a wider target for the kill
PADDING = "0123456789abcdef" * 16384


class SaveLoop:
    """Changes the seed and saves, over and over, remembering what was answered."""

    def __init__(self, client: Client, start: int) -> None:
        self.client = client
        self.confirmed: int | None = start  # the last seed whose save was answered
        self.in_flight: int | None = None  # a seed being saved when the kill came

    async def run(self) -> None:
        assert self.confirmed is not None
        seed = self.confirmed
        while True:
            seed += 1
            await self.client.setting("seed", seed)
            self.in_flight = seed
            assert (await self.client.post("/save_settings", {}))["status"] is True
            self.confirmed, self.in_flight = seed, None


async def test_kill_during_settings_saves_leaves_old_or_new_file(
        tmp_path: Path, default_model_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = data / "local_config.yaml"
    # an unknown key is kept by every save (SPEC 6), which makes each write large
    config.write_text(yaml.safe_dump({"padding": PADDING}), encoding="utf-8")
    for round_ in range(4):
        server = await Server(data, default_model_path).start()
        client = Client(server.url)
        saves = SaveLoop(client, round_ * 1_000_000)
        base: dict[str, Any] | None = None
        try:
            await client.setting("seed", saves.confirmed)
            await client.post("/save_settings", {})
            base = yaml.safe_load(config.read_text(encoding="utf-8"))
            saving = asyncio.ensure_future(saves.run())
            await asyncio.sleep(0.5 + 0.37 * round_)
            assert not saving.done(), saving.exception()
            server.kill()
            await asyncio.gather(saving, return_exceptions=True)
        finally:
            await client.close()
            server.kill()

        text = config.read_text(encoding="utf-8")
        on_disk = yaml.safe_load(text)  # parses: never truncated or mixed
        assert isinstance(on_disk, dict) and base is not None
        assert on_disk["seed"] in {saves.confirmed, saves.in_flight} - {None}, (
            on_disk["seed"], saves.confirmed, saves.in_flight)
        assert on_disk == {**base, "seed": on_disk["seed"]}
        assert on_disk["padding"] == PADDING
        restarted = await Server(data, default_model_path).start()
        client = Client(restarted.url)
        try:
            assert (await client.get("/get_config"))["seed"] == on_disk["seed"]
        finally:
            await client.close()
            restarted.stop()
        print(f"\nround {round_}: {on_disk['seed'] - round_ * 1_000_000} saves, the file "
              f"holds the {'newest' if on_disk['seed'] == saves.confirmed else 'in-flight'} one; "
              f"{len(list(data.glob('.local_config.yaml.*')))} temporary file(s) left")
