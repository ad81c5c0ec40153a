"""Generation over Socket.IO against a real server on the real default model (SPEC section 4).

Each test drives the server like a browser: HTTP calls and a python-socketio client sharing
one session cookie. Greedy sampling (temperature 0) keeps the runs short and repeatable;
nothing here compares batched text with solo text (CPU batching changes logits slightly).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from chatkit import COUNT_PROMPT, COUNTER_SETTINGS, Browser, install_counter_personality
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.engine import (
    Engine,
    FinishReason,
    Generation,
    GenerationRequest,
    load_engine,
)
from lollms_fast.server.keys import ENGINE_CONTROL

Factory = Callable[..., Any]


def chat_config(make_config: Callable[..., Config], **overrides: Any) -> Config:
    values: dict[str, Any] = dict(override_personality_model_parameters=True, temperature=0.0,
                                  n_predict=24, seed=7)
    values.update(overrides)
    return make_config(**values)


@pytest.fixture
async def server(aiohttp_server: Factory, make_config: Callable[..., Config]) -> TestServer:
    return await aiohttp_server(build_app(chat_config(make_config)))


@pytest.fixture
async def browsers(server: TestServer) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Browser] = []

    async def open_browser(**kw: Any) -> Browser:
        b = await Browser.open(str(server.make_url("")).rstrip("/"), **kw)
        opened.append(b)
        return b

    yield open_browser
    for b in opened:
        await b.close()


def assert_run_shape(run: list[tuple[str, Any]], *, delta: bool) -> str:
    """infos(generation_started), message*, final — consistent ids; returns the text."""
    names = [n for n, _ in run]
    assert names[0] == "infos" and names[-1] == "final", names
    assert set(names[1:-1]) <= {"message"}, names
    infos, final = run[0][1], run[-1][1]
    assert infos["status"] == "generation_started"
    assert infos["type"] == "input_message_infos"
    text = ""
    for _, m in run[1:-1]:
        for key in ("user_message_id", "ai_message_id", "discussion_id"):
            assert m[key] == infos[key]
        assert m["message_type"] == 0
        assert "\ufffd" not in m["data"]  # never a split UTF-8 character
        if delta:
            text += m["data"]
        else:
            assert m["data"].startswith(text)  # compat mode: the whole answer so far
            text = m["data"]
    assert final["data"] == text
    assert final["ai_message_id"] == infos["ai_message_id"]
    assert final["parent"] == infos["user_message_id"]
    assert final["discussion_id"] == infos["discussion_id"]
    assert final["finish_reason"] in ("stop", "length")
    return text


async def test_generate_msg_streams_and_saves(browsers: Factory) -> None:
    b = await browsers()
    final = await b.generate("Name three colours.")
    run = b.of_run(final)
    text = assert_run_shape(run, delta=False)
    infos = run[0][1]
    assert infos["message"] == "Name three colours." and infos["bot"] == "lollms"
    assert len(run) > 2  # something was streamed

    rows = await b.messages(final["discussion_id"])
    by_id = {r["id"]: r for r in rows}
    user, ai = by_id[infos["user_message_id"]], by_id[final["ai_message_id"]]
    assert user["sender"] == "user" and user["content"] == "Name three colours."
    assert ai["content"] == text and ai["parent"] == user["id"] and ai["sender"] == "lollms"
    assert rows[0]["type"] == 1  # the discussion was created with its conditioning
    status, listing = await b.get("/list_discussions")
    assert {"id": final["discussion_id"], "title": "untitled"} in listing


async def test_second_turn_continues_the_branch(browsers: Factory) -> None:
    b = await browsers()
    first = await b.generate("Hello!")
    second = await b.generate("And again?")
    assert second["discussion_id"] == first["discussion_id"]
    rows = {r["id"]: r for r in await b.messages(first["discussion_id"])}
    assert rows[second["parent"]]["parent"] == first["ai_message_id"]


async def test_generate_msg_from_makes_a_sibling(browsers: Factory) -> None:
    b = await browsers()
    first = await b.generate("Tell me a fact.")
    again = await b.regenerate(first["parent"])
    assert_run_shape(b.of_run(again), delta=False)
    assert again["ai_message_id"] != first["ai_message_id"]
    assert again["parent"] == first["parent"]
    # regenerating from the answer itself answers the same question again
    third = await b.regenerate(first["ai_message_id"])
    assert third["parent"] == first["parent"]
    rows = await b.messages(first["discussion_id"])
    answers = [r for r in rows if r["parent"] == first["parent"]]
    assert len(answers) == 3
    assert sum(1 for r in rows if r["sender"] == "user") == 1  # no user row was added


async def test_delta_mode_sends_only_new_text(browsers: Factory) -> None:
    b = await browsers(delta=True)
    final = await b.generate("Count from one to five.")
    text = assert_run_shape(b.of_run(final), delta=True)
    rows = {r["id"]: r for r in await b.messages(final["discussion_id"])}
    assert rows[final["ai_message_id"]]["content"] == text


@pytest.mark.slow
async def test_stop_ends_with_cancelled_and_saves(aiohttp_server: Factory,
                                                  make_config: Callable[..., Config],
                                                  tmp_path: Path) -> None:
    # the counting answer cannot end by itself before n_predict: only the stop ends it
    install_counter_personality(tmp_path / "data")
    server = await aiohttp_server(build_app(chat_config(make_config, n_predict=500,
                                                        **COUNTER_SETTINGS)))
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        await b.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(b.first_message.wait(), 60)
        await b.sio.emit("stop_gen")
        final = await asyncio.wait_for(b.finals.get(), 60)
        assert final["finish_reason"] == "cancelled"
        # a round trip on the same socket: whatever the server sent before answering this
        # call has arrived, and nothing of the generation came after its final
        await b.sio.call("stop_gen", timeout=30)
        assert b.events[-1][0] == "final" and b.events[-1][1] is final
        run = b.of_run(final)
        streamed = [d["data"] for n, d in run if n == "message"]
        assert final["data"] == streamed[-1]
        rows = {r["id"]: r for r in await b.messages(final["discussion_id"])}
        assert rows[final["ai_message_id"]]["content"] == final["data"]
        _, status = await b.get("/get_generation_status")
        assert status == {"status": False}
    finally:
        await b.close()


async def test_http_stop_gen_stops_this_clients_generation(
        aiohttp_server: Factory, make_config: Callable[..., Config], tmp_path: Path) -> None:
    install_counter_personality(tmp_path / "data")
    server = await aiohttp_server(build_app(chat_config(make_config, n_predict=300,
                                                        **COUNTER_SETTINGS)))
    base = str(server.make_url("")).rstrip("/")
    mine, other = await Browser.open(base), await Browser.open(base)
    try:
        await mine.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await other.sio.emit("generate_msg", {"prompt": "Hi"})
        await asyncio.wait_for(mine.first_message.wait(), 60)
        status, body = await mine.get("/stop_gen")
        assert status == 200 and body == {"status": True}
        final = await asyncio.wait_for(mine.finals.get(), 60)
        assert final["finish_reason"] == "cancelled", (final, mine.events[:3])
        other_final = await asyncio.wait_for(other.finals.get(), 120)
        assert other_final["finish_reason"] in ("stop", "length")  # not stopped by mine
    finally:
        await mine.close()
        await other.close()


async def test_four_clients_at_once_no_cross_talk(browsers: Factory) -> None:
    clients = [await browsers() for _ in range(4)]
    prompts = ["What is rain?", "Name a fruit.", "Say something kind.", "What is 2+2?"]
    finals = await asyncio.gather(*(c.generate(p) for c, p in zip(clients, prompts, strict=False)))
    discussions = {f["discussion_id"] for f in finals}
    assert len(discussions) == 4
    for client, final, prompt in zip(clients, finals, prompts, strict=False):
        run = client.of_run(final)
        assert_run_shape(run, delta=False)
        assert run[0][1]["message"] == prompt
        # every event this client saw belongs to its own discussion
        assert {d["discussion_id"] for n, d in client.events
                if n in ("infos", "message", "final")} == {final["discussion_id"]}


def recording_loader(generations: list[Generation]) -> Callable[[Config], Engine]:
    """The real engine, remembering every Generation its public `submit` hands out."""
    def load(config: Config) -> Engine:
        engine = load_engine(config)
        submit = engine.submit

        def recording_submit(request: GenerationRequest) -> Generation:
            generation = submit(request)
            generations.append(generation)
            return generation

        engine.submit = recording_submit  # type: ignore[method-assign]
        return engine
    return load


@pytest.mark.slow
async def test_disconnect_cancels_and_frees_the_slot(
        aiohttp_server: Factory, make_config: Callable[..., Config], tmp_path: Path) -> None:
    """The engine's own finish says `cancelled` (the counting answer cannot end by itself
    before n_predict), and the slot serves the next client."""
    generations: list[Generation] = []
    install_counter_personality(tmp_path / "data")
    app = build_app(chat_config(make_config, parallel=1, n_predict=500, **COUNTER_SETTINGS),
                    backend_factory=recording_loader(generations))
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    leaving = await Browser.open(base)
    staying = await Browser.open(base)
    try:
        await leaving.sio.emit("generate_msg", {"prompt": COUNT_PROMPT})
        await asyncio.wait_for(leaving.first_message.wait(), 60)
        infos = leaving.events[0][1]
        engine = app[ENGINE_CONTROL].current
        assert engine is not None and len(generations) == 1
        await leaving.sio.disconnect()
        finish = await asyncio.wait_for(generations[0].wait(), 60)
        assert finish.reason is FinishReason.CANCELLED, finish
        assert finish.n_generated < 500
        assert engine.stats()["slots_busy"] == 0
        # and the next request (a short one) is served by the only slot
        status, reply = await staying.post("/update_setting", {"setting_name": "n_predict",
                                                               "setting_value": 24})
        assert reply["status"] is True
        final = await staying.generate("Hi")
        assert final["finish_reason"] in ("stop", "length")
        assert engine.stats()["requests"] == 2
        # the partial answer was saved, all of it
        for _ in range(500):
            rows = {r["id"]: r for r in await staying.messages(infos["discussion_id"])}
            if rows[infos["ai_message_id"]]["content"] == finish.text:
                break
            await asyncio.sleep(0.01)
        assert finish.text and rows[infos["ai_message_id"]]["content"] == finish.text
    finally:
        await leaving.close()
        await staying.close()


async def test_no_model_ends_with_error(aiohttp_server: Factory,
                                        make_config: Callable[..., Config]) -> None:
    server = await aiohttp_server(build_app(chat_config(make_config), backend_factory=None))
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        final = await b.generate("Hello?")
        assert final["finish_reason"] == "error"
        infos = [d for n, d in b.events if n == "infos"]
        assert infos and infos[0]["status"] == "model_not_ready" and infos[0]["message"]
        assert [n for n, _ in b.events] == ["infos", "final"]
    finally:
        await b.close()


async def test_context_overflow_is_an_error_and_writes_nothing(browsers: Factory) -> None:
    b = await browsers()
    status, created = await b.get("/new_discussion", title="long")
    before = await b.messages(created["id"])
    final = await b.generate("word " * 3000)  # far beyond ctx_size 1024
    assert final["finish_reason"] == "error"
    infos = [d for n, d in b.events if n == "infos"]
    assert infos[-1]["status"] == "error" and "context" in infos[-1]["message"]
    assert await b.messages(created["id"]) == before


async def test_bad_payloads_end_with_an_error(browsers: Factory) -> None:
    b = await browsers()
    for payload in (None, {"prompt": 5}, {"prompt": ""}, ["x"], {"prompt": "nul \x00 in it"}):
        await b.sio.emit("generate_msg", payload)
        final = await asyncio.wait_for(b.finals.get(), 30)
        assert final["finish_reason"] == "error"
    for payload in ({"id": "abc"}, {"id": 99999999}, {"id": "1; DROP TABLE message"}):
        await b.sio.emit("generate_msg_from", payload)
        final = await asyncio.wait_for(b.finals.get(), 30)
        assert final["finish_reason"] == "error"
    status, listing = await b.get("/list_discussions")
    assert listing == []
