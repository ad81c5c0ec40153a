"""The Socket.IO generation path driven by a scripted backend (tests/fakes.py), where a test
must choose the exact bytes of every token: UTF-8 characters split across tokens, an
anti-prompt split across tokens, text that only looks like the start of an anti-prompt.
The real-model tests in test_chat.py cover the same path with real tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from chatkit import Browser
from fakes import ScriptedBackend, scripted_loader
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.engine import Engine
from lollms_fast.services.chat import _Checkpointer

Factory = Callable[..., Any]


async def scripted_server(aiohttp_server: Factory, make_config: Callable[..., Config],
                          script: Sequence[bytes], **kw: Any) -> TestServer:
    config = make_config(override_personality_model_parameters=True, n_predict=64,
                         ctx_size=2048, parallel=2)
    return await aiohttp_server(build_app(config, backend_factory=scripted_loader(script, **kw)))


async def run_once(server: TestServer, *, delta: bool) -> tuple[list[str], dict[str, Any],
                                                                Browser]:
    b = await Browser.open(str(server.make_url("")).rstrip("/"), delta=delta)
    final = await b.generate("hi")
    pieces = [d["data"] for n, d in b.of_run(final) if n == "message"]
    return pieces, final, b


SPLIT_SCRIPT = [b"Hel", b"lo \xf0\x9f", b"\x98\x80 caf", b"\xc3", b"\xa9 #", b"## Us",
                b"er: and now I talk to myself"]


@pytest.mark.parametrize("delta", [True, False])
async def test_pieces_keep_characters_whole_and_cut_the_anti_prompt(
        aiohttp_server: Factory, make_config: Callable[..., Config], delta: bool) -> None:
    server = await scripted_server(aiohttp_server, make_config, SPLIT_SCRIPT)
    pieces, final, b = await run_once(server, delta=delta)
    try:
        assert final["data"] == "Hello 😀 café "
        assert final["finish_reason"] == "stop"
        texts = pieces if delta else [
            p[len(prev):] for prev, p in zip([""] + pieces, pieces, strict=False)]
        assert "".join(texts) == final["data"]
        for piece in texts:
            assert "\ufffd" not in piece
            assert "#" not in piece  # no part of the anti-prompt ever left the server
        # the emoji arrived whole in one piece although its bytes were in two tokens
        assert any("😀" in p for p in texts)
        rows = {r["id"]: r for r in await b.messages(final["discussion_id"])}
        assert rows[final["ai_message_id"]]["content"] == "Hello 😀 café "
    finally:
        await b.close()


async def test_text_that_only_looks_like_an_anti_prompt_is_released(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    script = [b"Rule #", b"#1: be kind. ##", b"# Tip: smile."]
    server = await scripted_server(aiohttp_server, make_config, script)
    pieces, final, b = await run_once(server, delta=True)
    try:
        assert final["data"] == "Rule ##1: be kind. ### Tip: smile."
        assert "".join(pieces) == final["data"]
        assert final["finish_reason"] == "stop"
    finally:
        await b.close()


async def test_decode_error_ends_with_error_and_infos(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    # token 2 + ord("h") is in every prompt ("hi"): the prompt decode fails
    server = await scripted_server(aiohttp_server, make_config, [b"x"],
                                   fail_token=2 + ord("h"))
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        final = await b.generate("hi")
        assert final["finish_reason"] == "error"
        infos = [d for n, d in b.events if n == "infos"]
        assert infos[0]["status"] == "generation_started"
        assert infos[-1]["status"] == "error" and infos[-1]["message"]
        assert [n for n, _ in b.events][-1] == "final"
    finally:
        await b.close()


async def test_settings_events_reply_to_the_sender_only(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    server = await scripted_server(aiohttp_server, make_config, [b"x"])
    base = str(server.make_url("")).rstrip("/")
    a, other = await Browser.open(base), await Browser.open(base)
    try:
        await a.sio.emit("update_setting", {"setting_name": "temperature",
                                            "setting_value": 0.3})
        await a.sio.emit("update_setting", {"setting_name": "top_k",
                                            "setting_value": "lots"})
        await a.sio.emit("save_settings")
        for _ in range(100):
            if len(a.events) >= 3:
                break
            await asyncio.sleep(0.05)
        replies = [(n, d) for n, d in a.events]
        assert replies[0] == ("update_setting", {"setting_name": "temperature",
                                                 "status": True})
        assert replies[1][0] == "update_setting" and replies[1][1]["status"] is False
        assert replies[1][1]["error"]
        assert replies[2] == ("save_settings", {"status": True})
        assert other.events == []
        status, config = await a.get("/get_config")
        assert config["temperature"] == 0.3 and config["top_k"] == 50
    finally:
        await a.close()
        await other.close()


class _CountingStore:
    def __init__(self) -> None:
        self.writes: list[str] = []

    async def update_content(self, _message_id: int, text: str) -> bool:
        self.writes.append(text)
        return True


async def test_checkpoints_are_rare_and_the_last_write_is_complete() -> None:
    store = _CountingStore()
    saver = _Checkpointer(store, 1, interval=3600.0)  # type: ignore[arg-type]
    text = ""
    for i in range(2000):  # a long answer streamed quickly
        text += f"{i} "
        saver.maybe_save(text)
    await saver.close(text)
    assert store.writes == [text]  # one write at the end, none per token

    store = _CountingStore()
    saver = _Checkpointer(store, 1, interval=0.0)  # type: ignore[arg-type]
    for i in range(50):
        saver.maybe_save(str(i))
        await asyncio.sleep(0)
    await saver.close("final")
    assert store.writes[-1] == "final"  # the end write comes last, after any checkpoint
    # the real 1 s interval over a real stream: tests/test_chat_behaviour.py


async def test_engine_reload_lets_running_answers_finish(
        aiohttp_server: Factory, make_config: Callable[..., Config],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing ctx_size loads a new engine; the answer running on the old one finishes
    (not cancelled) before the old engine is closed, and the next one uses the new engine.
    While the old one drains, another reload is refused (at most one engine drains)."""
    import threading

    from lollms_fast.services import engine_control

    gate = threading.Semaphore(0)
    engines: list[Engine] = []

    def loader(config: Config) -> Engine:
        # the first engine is gated (steps only when the test releases it); later ones run
        backend = ScriptedBackend([b"a", b"b"], eog_after=False,
                                  gate=gate if not engines else None)
        engine = Engine(backend, parallel=config.parallel, n_ctx_slot=config.ctx_size,
                        n_batch=config.n_batch, queue_size=config.queue_size)
        engine.start()
        engines.append(engine)
        return engine

    config = make_config(override_personality_model_parameters=True, n_predict=20,
                         ctx_size=2048, parallel=2)
    server = await aiohttp_server(build_app(config, backend_factory=loader))
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        await b.sio.emit("generate_msg", {"prompt": "hi"})
        for _ in range(200):  # wait until the answer is running on the first engine
            if engines[0].stats()["slots_busy"]:
                break
            await asyncio.sleep(0.01)
        # the reload answers at once; the old engine drains in the background
        status, body = await b.post("/update_setting", {"setting_name": "ctx_size",
                                                        "setting_value": 1536})
        assert status == 200 and body["status"] is True
        assert len(engines) == 2 and not engines[0].backend.closed
        monkeypatch.setattr(engine_control, "DRAIN_WAIT_S", 0.05)
        status, body = await b.post("/update_setting", {"setting_name": "ctx_size",
                                                        "setting_value": 1024})
        assert status == 200 and body["status"] is False, body
        assert "still finishing" in body["error"] and len(engines) == 2
        gate.release(1000)
        final = await asyncio.wait_for(b.finals.get(), 30)
        assert final["finish_reason"] == "length" and final["data"] == "ab" * 10
        for _ in range(200):
            if engines[0].backend.closed:
                break
            await asyncio.sleep(0.01)
        assert engines[0].backend.closed
        second = await b.generate("again")
        assert second["finish_reason"] == "length"
        assert engines[1].stats()["requests"] == 1
        status, body = await b.post("/update_setting", {"setting_name": "ctx_size",
                                                        "setting_value": 1024})
        assert body["status"] is True and len(engines) == 3  # drained: reloads work again
    finally:
        gate.release(1000)
        await b.close()


async def test_disconnect_cancels_within_a_step(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    """An answer that would never end by itself (no end-of-generation in the script) stops
    when its client goes away, and frees its slot for the next client."""
    import threading

    from lollms_fast.server.keys import ENGINE_CONTROL, SIO

    gate = threading.Semaphore(0)
    config = make_config(override_personality_model_parameters=True, n_predict=500,
                         ctx_size=2048, parallel=1)
    app = build_app(config, backend_factory=scripted_loader([b"a"], eog_after=False,
                                                            gate=gate))
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    leaving, staying = await Browser.open(base), await Browser.open(base)
    try:
        engine = app[ENGINE_CONTROL].current
        await leaving.sio.emit("generate_msg", {"prompt": "hi"})
        gate.release(3)  # prompt decode and a couple of answer tokens
        await asyncio.wait_for(leaving.first_message.wait(), 10)
        sid = leaving.sio.get_sid()
        await leaving.sio.disconnect()
        for _ in range(500):  # the server has seen the disconnect
            if not app[SIO].manager.is_connected(sid, "/"):
                break
            await asyncio.sleep(0.01)
        gate.release(10_000)  # from now on the engine runs freely
        for _ in range(500):
            if engine.stats()["slots_busy"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert stats["slots_busy"] == 0 and stats["generated"] < 20  # not 500
        final = await staying.generate("hi")
        assert final["finish_reason"] == "length" and final["data"] == "a" * 500
    finally:
        gate.release(10_000)
        await leaving.close()
        await staying.close()


async def test_a_long_message_is_answered_until_the_context_ends(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    """n_predict (1024) is a maximum, not a reservation: a 1,400-token message (about 1,700
    with the conditioning) in a 2048-token slot is accepted, and the answer stops with
    `length` where the context ends."""
    config = make_config(override_personality_model_parameters=True, n_predict=1024,
                         ctx_size=2048, parallel=1)
    app = build_app(config, backend_factory=scripted_loader([b"a"], eog_after=False))
    server = await aiohttp_server(app)
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        await b.get("/new_discussion", title="long paste")
        final = await b.generate("x" * 1400)  # the scripted tokenizer: one token per byte
        assert final["finish_reason"] == "length", [d.get("message") for n, d in b.events
                                                    if n == "infos"]
        answered = len(final["data"])
        assert 0 < answered < 1024  # cut by the context, not by n_predict
        from lollms_fast.server.keys import ENGINE_CONTROL
        engine = app[ENGINE_CONTROL].current
        assert engine is not None
        prompt_tokens = engine.stats()["prompt_decoded"]
        # every position of the slot is used; the last token sampled needs none
        assert prompt_tokens > 1400 and answered == 2048 - prompt_tokens + 1
        saved = await b.messages(final["discussion_id"])
        assert saved[-1]["content"] == final["data"]
    finally:
        await b.close()
