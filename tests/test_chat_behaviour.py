"""Chat behaviour a user notices, over a real server, a real SQLite file and a real Socket.IO
client, with the scripted backend (tests/fakes.py) where the test must control the engine
step by step (its `gate`) or read the exact prompt the engine was handed.

Covered here: the generation status per client, one generation per session, the
`cancel_generation` event, the `auth` form of delta mode, the polling transport, the 1 s
checkpoints, which sampling parameters reach the engine, what history the prompt holds
(the answered branch, `nb_messages_to_remember`, token trimming) and the fallback from a
broken personality.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from chatkit import Browser
from fakes import BYTE0, SCRIPT0, ScriptedBackend
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.engine import Engine, GenerationRequest, SamplingParams
from lollms_fast.services.chat import CHECKPOINT_INTERVAL_S
from lollms_fast.storage.discussions import SQLiteStore

Factory = Callable[..., Any]


@dataclass
class Recorder:
    """Every request handed to an engine of the app (through the public `submit`)."""

    requests: list[GenerationRequest] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)

    def prompt_text(self, index: int = -1) -> str:
        """The prompt as the engine received it, decoded (scripted vocabulary: one token
        per byte, BOS dropped)."""
        tokens = self.requests[index].tokens
        return bytes(t - BYTE0 for t in tokens if BYTE0 <= t < SCRIPT0).decode("utf-8")


def recording_loader(script: Sequence[bytes], recorder: Recorder,
                     **backend_kw: Any) -> Callable[[Config], Engine]:
    def load(config: Config) -> Engine:
        engine = Engine(ScriptedBackend(script, **backend_kw), parallel=config.parallel,
                        n_ctx_slot=config.ctx_size, n_batch=config.n_batch,
                        queue_size=config.queue_size)
        submit = engine.submit

        def recording_submit(request: GenerationRequest) -> Any:
            recorder.requests.append(request)
            return submit(request)

        engine.submit = recording_submit  # type: ignore[method-assign]
        engine.start()
        recorder.engines.append(engine)
        return engine
    return load


@dataclass
class Setup:
    server: TestServer
    recorder: Recorder
    gate: threading.Semaphore | None
    opened: list[Browser] = field(default_factory=list)

    async def browser(self, **kw: Any) -> Browser:
        b = await Browser.open(str(self.server.make_url("")).rstrip("/"), **kw)
        self.opened.append(b)
        return b


@pytest.fixture
async def setup(aiohttp_server: Factory, make_config: Callable[..., Config]
                ) -> AsyncIterator[Callable[..., Any]]:
    """setup(script, gated=False, eog_after=True, **config) -> a running Setup."""
    made: list[Setup] = []

    async def make(script: Sequence[bytes] = (b"ok",), *, gated: bool = False,
                   eog_after: bool = True, **config: Any) -> Setup:
        values: dict[str, Any] = dict(override_personality_model_parameters=True,
                                      n_predict=64, ctx_size=2048, parallel=2)
        values.update(config)
        recorder = Recorder()
        gate = threading.Semaphore(0) if gated else None
        loader = recording_loader(script, recorder, eog_after=eog_after, gate=gate)
        server = await aiohttp_server(build_app(make_config(**values), backend_factory=loader))
        s = Setup(server, recorder, gate)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.gate is not None:
            s.gate.release(100_000)  # nothing may stay blocked at the gate
        for b in s.opened:
            await b.close()


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    """Wait for a condition the test caused (a timeout, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def started(b: Browser) -> list[dict[str, Any]]:
    return [d for n, d in b.events if n == "infos" and d["status"] == "generation_started"]


def messages(b: Browser) -> list[dict[str, Any]]:
    return [d for n, d in b.events if n == "message"]


# ---------------------------------------------------------------- generation control


async def test_generation_status_is_true_only_for_the_generating_client(setup: Factory) -> None:
    s = await setup([b"a"], gated=True, eog_after=False, n_predict=5)
    mine, other = await s.browser(), await s.browser()
    assert (await mine.get("/get_generation_status"))[1] == {"status": False}
    await mine.sio.emit("generate_msg", {"prompt": "hi"})
    await until(lambda: started(mine), "the generation to start")
    # the engine is held at its gate: the answer is running
    assert (await mine.get("/get_generation_status")) == (200, {"status": True})
    assert (await other.get("/get_generation_status")) == (200, {"status": False})
    assert s.gate is not None
    s.gate.release(100)
    final = await asyncio.wait_for(mine.finals.get(), 20)
    assert final["finish_reason"] == "length" and final["data"] == "aaaaa"
    assert (await mine.get("/get_generation_status"))[1] == {"status": False}


async def test_one_generation_per_session(setup: Factory) -> None:
    """A second generate_msg while one runs gets an error `final` and writes nothing; the
    first answer goes on to its end."""
    s = await setup([b"a"], gated=True, eog_after=False, n_predict=6)
    b = await s.browser()
    await b.sio.emit("generate_msg", {"prompt": "first"})
    await until(lambda: started(b), "the first generation to start")
    first = started(b)[0]
    await b.sio.emit("generate_msg", {"prompt": "second"})
    refused = await asyncio.wait_for(b.finals.get(), 20)  # the engine is still held
    assert refused["finish_reason"] == "error" and refused["data"] == ""
    errors = [d for n, d in b.events if n == "infos" and d["status"] == "error"]
    assert len(errors) == 1 and "already running" in errors[0]["message"]
    assert len(s.recorder.requests) == 1  # the second never reached the engine
    assert s.gate is not None
    s.gate.release(100)
    final = await asyncio.wait_for(b.finals.get(), 20)
    assert final["ai_message_id"] == first["ai_message_id"]
    assert final["finish_reason"] == "length" and final["data"] == "a" * 6
    rows = await b.messages(final["discussion_id"])
    assert [r["content"] for r in rows if r["sender"] == "user"] == ["first"]
    assert rows[-1]["id"] == final["ai_message_id"] and rows[-1]["content"] == "a" * 6


async def test_cancel_generation_event_stops_the_answer(setup: Factory) -> None:
    s = await setup([b"a"], gated=True, eog_after=False, n_predict=500)
    b = await s.browser()
    await b.sio.emit("generate_msg", {"prompt": "hi"})
    assert s.gate is not None
    s.gate.release(3)  # the prompt and two more steps
    await asyncio.wait_for(b.first_message.wait(), 20)
    # a round trip on the socket: the server has handled cancel_generation when it answers
    await b.sio.emit("cancel_generation")
    await b.sio.call("save_settings", timeout=20)
    s.gate.release(100_000)  # from now on the engine runs freely
    final = await asyncio.wait_for(b.finals.get(), 20)
    assert final["finish_reason"] == "cancelled"
    assert 0 < len(final["data"]) < 10  # not the 500 tokens it would have written
    rows = {r["id"]: r for r in await b.messages(final["discussion_id"])}
    assert rows[final["ai_message_id"]]["content"] == final["data"]


# ---------------------------------------------------------------- stream modes, transports


SCRIPT = [b"Hel", b"lo, ", b"wor", b"ld"]


async def test_auth_payload_selects_delta_mode(setup: Factory) -> None:
    s = await setup(SCRIPT)
    delta = await s.browser(auth={"stream": "delta"})
    compat = await s.browser(auth={"stream": "whole"})
    for b in (delta, compat):
        final = await b.generate("hi")
        assert final["finish_reason"] == "stop" and final["data"] == "Hello, world"
    assert [m["data"] for m in messages(delta)] == ["Hel", "lo, ", "wor", "ld"]
    assert [m["data"] for m in messages(compat)] == ["Hel", "Hello, ", "Hello, wor",
                                                    "Hello, world"]


async def test_generation_over_the_polling_transport(setup: Factory) -> None:
    s = await setup(SCRIPT)
    b = await s.browser(transports=["polling"])
    assert b.sio.transport() == "polling"
    final = await b.generate("hi")
    assert final["finish_reason"] == "stop" and final["data"] == "Hello, world"
    run = b.of_run(final)
    assert [n for n, _ in run] == ["infos"] + ["message"] * 4 + ["final"]
    assert run[-2][1]["data"] == "Hello, world"
    rows = {r["id"]: r for r in await b.messages(final["discussion_id"])}
    assert rows[final["ai_message_id"]]["content"] == "Hello, world"
    # the page and its polling socket share one session: its answer is over
    assert (await b.get("/get_generation_status"))[1] == {"status": False}
    # python-engineio's client waits for its pending long-poll GET on a graceful
    # disconnect (over a minute, the same against a bare python-socketio server)
    await b.sio.eio.disconnect(abort=True)


# ---------------------------------------------------------------- checkpoints


async def test_checkpoints_at_most_once_a_second_at_the_default_interval(
        setup: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real 1 s interval: a burst of 300 pieces is not saved piece by piece (at
    most one write per full second that passed, measured, so a slow machine cannot make
    this fail), and after a pause of more than a second the next piece is saved, readable
    by /load_discussion while the answer still runs."""
    assert CHECKPOINT_INTERVAL_S == 1.0
    writes: list[str] = []
    update_content = SQLiteStore.update_content

    async def counting(self: SQLiteStore, message_id: int, content: str) -> bool:
        writes.append(content)
        return await update_content(self, message_id, content)

    monkeypatch.setattr(SQLiteStore, "update_content", counting)
    s = await setup([b"a"], gated=True, eog_after=False, n_predict=1000)
    b = await s.browser()
    assert s.gate is not None
    burst = 300
    begun = time.monotonic()  # before the answer (and its checkpoint clock) starts
    await b.sio.emit("generate_msg", {"prompt": "hi"})
    s.gate.release(burst)  # the prompt decode gives piece 1, then one piece per step
    await until(lambda: len(messages(b)) == burst, "the burst of pieces")
    elapsed = time.monotonic() - begun
    assert len(writes) <= int(elapsed / CHECKPOINT_INTERVAL_S), (len(writes), elapsed)

    # the engine waits at its gate for more than the interval; the next piece is saved
    seen = len(writes)
    await asyncio.sleep(CHECKPOINT_INTERVAL_S + 0.2)
    s.gate.release(1)
    await until(lambda: len(writes) > seen, "a checkpoint after the pause")
    assert writes[-1] == "a" * (burst + 1)
    infos = started(b)[0]
    assert (await b.get("/get_generation_status"))[1] == {"status": True}  # still running
    await until(lambda: len(messages(b)) == burst + 1, "the piece after the pause")
    rows = {r["id"]: r for r in await b.messages(infos["discussion_id"])}
    assert rows[infos["ai_message_id"]]["content"] == "a" * (burst + 1)

    await b.sio.emit("stop_gen")
    await b.sio.call("save_settings", timeout=20)  # the stop has been handled
    s.gate.release(100_000)
    final = await asyncio.wait_for(b.finals.get(), 20)
    assert final["finish_reason"] == "cancelled"
    assert writes[-1] == final["data"]  # the last write is the whole answer


# ---------------------------------------------------------------- sampling parameters


TESTER = """\
name: tester
author: tests
user_message_prefix: "### asker:\\n"
ai_message_prefix: "### tester:\\n"
link_text: "\\n"
personality_conditioning: "You are a test personality.\\n"
anti_prompts: ["### asker"]
model_temperature: 0.33
model_n_predicts: 9
model_top_k: 7
model_top_p: 0.5
model_repeat_penalty: 1.05
model_repeat_last_n: 12
"""


def write_personality(data_dir: Path, folder: str, text: str) -> None:
    path = data_dir / "personalities" / "english" / "general" / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(text, encoding="utf-8")


async def test_personality_parameters_unless_the_config_overrides_them(
        setup: Factory, tmp_path: Path) -> None:
    write_personality(tmp_path / "data", "tester", TESTER)
    s = await setup([b"a"], eog_after=False, override_personality_model_parameters=False,
                    personality="tester", temperature=0.6, top_k=11, top_p=0.8,
                    repeat_penalty=1.4, repeat_last_n=20, n_predict=13, seed=5)
    b = await s.browser()
    final = await b.generate("hi")
    assert s.recorder.requests[-1].params == SamplingParams(
        temperature=0.33, top_k=7, top_p=0.5, repeat_penalty=1.05, repeat_last_n=12,
        n_predict=9, seed=5)
    assert final["data"] == "a" * 9 and final["finish_reason"] == "length"
    assert started(b)[0]["bot"] == "tester"

    status, reply = await b.post("/update_setting", {
        "setting_name": "override_personality_model_parameters", "setting_value": "true"})
    assert reply["status"] is True
    final = await b.generate("again")
    assert s.recorder.requests[-1].params == SamplingParams(
        temperature=0.6, top_k=11, top_p=0.8, repeat_penalty=1.4, repeat_last_n=20,
        n_predict=13, seed=5)
    assert final["data"] == "a" * 13

    status, reply = await b.post("/update_setting", {
        "setting_name": "override_personality_model_parameters", "setting_value": "false"})
    assert reply["status"] is True
    await b.generate("once more")
    assert s.recorder.requests[-1].params.temperature == 0.33


# ---------------------------------------------------------------- history in the prompt


async def test_history_follows_the_answered_branch_and_its_limits(setup: Factory) -> None:
    s = await setup([b"ok"], n_predict=64, ctx_size=2048)
    b = await s.browser()

    async def answer(prompt: str, content: str) -> dict[str, Any]:
        final = await b.generate(prompt)
        status, body = await b.get("/update_message", id=final["ai_message_id"],
                                   message=content)
        assert body == {"status": True}
        return final

    first = await answer("alpha question", "alpha answer")
    await answer("bravo question", "bravo answer")
    # a new answer to the first question: the discussion now has two branches
    sibling = await b.regenerate(first["parent"])
    await b.get("/update_message", id=sibling["ai_message_id"], message="charlie answer")
    await answer("delta question", "delta answer")
    prompt = s.recorder.prompt_text()
    conditioning = (await b.messages(first["discussion_id"]))[0]
    assert conditioning["type"] == 1 and prompt.startswith(conditioning["content"])
    # the branch answered: alpha question -> charlie answer -> delta question
    assert "bravo" not in prompt and "alpha answer" not in prompt
    order = [prompt.index(t) for t in ("alpha question", "charlie answer", "delta question")]
    assert order == sorted(order)
    assert prompt.endswith("### user:\ndelta question\n### lollms:\n")

    # nb_messages_to_remember: only the last two turns of the branch
    status, reply = await b.post("/update_setting", {"setting_name": "nb_messages_to_remember",
                                                     "setting_value": 2})
    assert reply["status"] is True
    await b.generate("echo question")
    prompt = s.recorder.prompt_text()
    assert "delta question" in prompt and "delta answer" in prompt
    assert "alpha" not in prompt and "charlie" not in prompt
    assert prompt.startswith(conditioning["content"])

    # trimming by tokens: a turn that does not fit the history budget (2048 - 64 tokens,
    # one token per byte here) is dropped with everything older; newer turns stay
    await b.post("/update_setting", {"setting_name": "nb_messages_to_remember",
                                     "setting_value": 50})
    await b.get("/update_message", id=sibling["ai_message_id"],
                message="charlie answer " + "c" * 2000)
    await b.generate("foxtrot question")
    prompt = s.recorder.prompt_text()
    tokens = s.recorder.requests[-1].tokens
    assert len(tokens) <= 2048 - 64
    assert prompt.startswith(conditioning["content"])  # never the conditioning
    assert "charlie" not in prompt and "alpha question" not in prompt
    for kept in ("delta question", "delta answer", "echo question", "foxtrot question"):
        assert kept in prompt


# ---------------------------------------------------------------- personalities


async def test_a_broken_personality_falls_back_to_the_default_with_a_warning(
        setup: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_personality(tmp_path / "data", "broken", "name: [unclosed\n")
    caplog.set_level(logging.WARNING, logger="lollms_fast")
    s = await setup([b"ok"], personality="broken")
    b = await s.browser()
    final = await b.generate("hi")
    assert final["finish_reason"] == "stop" and final["data"] == "ok"
    assert started(b)[0]["bot"] == "lollms"  # the built-in default answered
    assert s.recorder.prompt_text().endswith("### user:\nhi\n### lollms:\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("english/general/broken" in w and "skipping" in w for w in warnings), warnings
    assert any("english/general/broken" in w and "default" in w for w in warnings), warnings
