"""The server's life around running answers, on the real default model: a SIGTERM to a real
`python -m lollms_fast` process saves the answer it cuts short, and an engine reload
(ctx_size) lets the running answer finish while the server keeps answering.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from chatkit import (
    COUNT_PROMPT,
    COUNTER_SETTINGS,
    Browser,
    ServerProcess,
    install_counter_personality,
    spawn_server,
)
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.server.keys import ENGINE_CONTROL

pytestmark = pytest.mark.slow

Factory = Callable[..., Any]


@pytest.fixture
def server_process(tmp_path: Path, default_model_path: Path) -> Iterator[
        tuple[str, ServerProcess, Path]]:
    data = tmp_path / "data"
    data.mkdir()
    install_counter_personality(data)  # counts on until n_predict: it cannot end early
    (data / "local_config.yaml").write_text("".join(
        f"{k}: {str(v).lower()}\n" for k, v in {**COUNTER_SETTINGS, "n_predict": 2000}.items()))
    with spawn_server(data, default_model_path, "--n-threads", "2", "--parallel", "1",
                      "--ctx-size", "2048") as server:
        yield server.base, server, data


async def test_sigterm_saves_the_running_answer(
        server_process: tuple[str, ServerProcess, Path]) -> None:
    base, server, data = server_process
    proc = server.proc
    b = await Browser.open(base)
    try:
        await b.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        for _ in range(6000):  # a few pieces have streamed
            if sum(1 for n, _ in b.events if n == "message") >= 5:
                break
            await asyncio.sleep(0.01)
        assert not [d for n, d in b.events if n == "final"], b.events  # still running
        infos = b.events[0][1]
        assert infos["status"] == "generation_started"
        streamed = [d["data"] for n, d in b.events if n == "message"][-1]
        proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(proc.wait, 60)
        finals = [d for n, d in b.events if n == "final"]
    finally:
        await b.close()
    stderr = server.output(limit=None)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr

    with sqlite3.connect(data / "databases" / "database.db") as db:
        row = db.execute("SELECT content, sender, parent FROM message WHERE id = ?",
                         (infos["ai_message_id"],)).fetchone()
    assert row is not None
    saved, sender, parent = row
    assert sender == "counter" and parent == infos["user_message_id"]
    # everything the client saw is saved (the end write, not an older checkpoint) ...
    assert saved.startswith(streamed) and saved.strip(), (saved, streamed)
    # ... and the answer stopped at the signal instead of counting on to the end of its
    # context (about 2,000 tokens, one a digit: past 400)
    assert saved.startswith(" 13") and " 300," not in saved, saved
    # the client was told before its socket closed: the answer ended `cancelled`, and the
    # saved row is that final text (the end write, not a checkpoint)
    assert len(finals) == 1, b.events[-3:]
    assert finals[0]["finish_reason"] == "cancelled" and finals[0]["data"] == saved, finals


async def test_engine_reload_while_answering(aiohttp_server: Factory,
                                             make_config: Callable[..., Config],
                                             tmp_path: Path) -> None:
    """Changing ctx_size loads a new engine of the real model; the answer running on the
    old one finishes (not cancelled), REST keeps answering meanwhile, and later answers
    come from the new engine."""
    install_counter_personality(tmp_path / "data")  # counts on until n_predict
    config = make_config(**COUNTER_SETTINGS, n_predict=300, parallel=2, ctx_size=1024)
    app = build_app(config)
    server: TestServer = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    running, later = await Browser.open(base), await Browser.open(base)
    try:
        old = app[ENGINE_CONTROL].current
        assert old is not None
        await running.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(running.first_message.wait(), 60)
        status, reply = await later.post("/update_setting", {"setting_name": "ctx_size",
                                                             "setting_value": 768})
        assert status == 200 and reply == {"setting_name": "ctx_size", "status": True}
        new = app[ENGINE_CONTROL].current
        assert new is not None and new is not old and new.n_ctx_slot == 768
        assert not [d for n, d in running.events if n == "final"]  # still running on `old`
        status, listing = await later.get("/list_discussions")  # REST answers meanwhile
        assert status == 200 and len(listing) == 1
        assert (await later.get("/get_config"))[1]["ctx_size"] == 768
        status, reply = await later.post("/update_setting", {"setting_name": "n_predict",
                                                             "setting_value": 16})
        assert reply["status"] is True  # for the next answers; the running one keeps 300

        final = await asyncio.wait_for(running.finals.get(), 120)
        assert final["finish_reason"] == "length", final  # n_predict, not cancelled
        streamed = [d["data"] for n, d in running.events if n == "message"]
        assert final["data"] == streamed[-1]
        rows = {r["id"]: r for r in await running.messages(final["discussion_id"])}
        assert rows[final["ai_message_id"]]["content"] == final["data"]
        assert old.stats()["requests"] == 1 and old.stats()["generated"] == 300

        answer = await later.generate(COUNT_PROMPT)
        assert answer["finish_reason"] == "length" and answer["data"].startswith(" 13,")
        assert new.stats()["requests"] == 1 and new.stats()["generated"] == 16
    finally:
        await running.close()
        await later.close()
