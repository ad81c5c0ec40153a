"""/health and /metrics (SPEC section 8): metrics are scraped and parsed with
prometheus_client's own parser while answers stream, and checked against what was generated."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chatkit import Browser
from fakes import ScriptedBackend
from lollms_fast.app import build_app
from lollms_fast.config import Config
from lollms_fast.engine import Engine
from lollms_fast.server.keys import ENGINE_CONTROL

Factory = Callable[..., Any]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(http: Any, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                     float]:
    async with http.get("/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        return samples(await resp.text())


def value(got: dict[Any, float], name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


async def test_health_without_an_engine_is_503(rest_client: TestClient) -> None:
    resp = await rest_client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["status"] == "error"


async def test_health_with_a_running_engine_and_after_it_stops(
        aiohttp_client: Any, make_config: Callable[..., Config]) -> None:
    def load(_config: Config) -> Engine:
        engine = Engine(ScriptedBackend([b"a"]), parallel=1, n_ctx_slot=256, n_batch=32,
                        queue_size=2)
        engine.start()
        return engine

    client = await aiohttp_client(build_app(make_config(api_key="k"), backend_factory=load))
    resp = await client.get("/health")  # no key needed
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    engine = client.server.app[ENGINE_CONTROL].current
    assert engine is not None
    await asyncio.to_thread(engine.close)
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "error"
    assert (await client.get("/metrics")).status == 401  # the key is needed there
    assert (await client.get("/metrics", headers={"X-API-Key": "k"})).status == 200


async def test_metrics_while_answers_stream_match_what_was_generated(
        aiohttp_server: Factory, make_config: Callable[..., Config]) -> None:
    """A gated scripted engine: scrape mid-answer (one slot generating), then after two
    answers of exactly known length; every counter and histogram count is checked."""
    gate = threading.Semaphore(0)
    script = [b"a", b"b", b"c", b"d", b"e"]  # then end-of-generation: 6 tokens sampled

    def load(config: Config) -> Engine:
        engine = Engine(ScriptedBackend(script, gate=gate), parallel=2,
                        n_ctx_slot=config.ctx_size, n_batch=config.n_batch,
                        queue_size=config.queue_size)
        engine.start()
        return engine

    config = make_config(override_personality_model_parameters=True, n_predict=64,
                         ctx_size=2048, parallel=2)
    app = build_app(config, backend_factory=load)
    server = await aiohttp_server(app)
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        empty = await scrape(b.http)
        assert value(empty, "lollms_generated_tokens_total") == 0
        assert value(empty, "lollms_slots", state="idle") == 2

        await b.sio.emit("generate_msg", {"prompt": "hello"})
        gate.release(3)  # the prompt, then two tokens
        await asyncio.wait_for(b.first_message.wait(), 10)
        mid = await scrape(b.http)
        assert value(mid, "lollms_slots", state="generating") == 1
        assert value(mid, "lollms_slots", state="idle") == 1
        assert 1 <= value(mid, "lollms_generated_tokens_total") <= 3
        assert value(mid, "lollms_requests_total", finish_reason="stop") == 0
        gate.release(10_000)
        first = await asyncio.wait_for(b.finals.get(), 10)
        second = await b.generate("hello again")
        assert first["data"] == second["data"] == "abcde"

        end = await scrape(b.http)
        engine = app[ENGINE_CONTROL].current
        assert engine is not None
        stats = engine.stats()
        assert value(end, "lollms_generated_tokens_total") == 12 == stats["generated"]
        assert value(end, "lollms_requests_total", finish_reason="stop") == 2
        assert value(end, "lollms_requests_total", finish_reason="error") == 0
        assert value(end, "lollms_prompt_tokens_total") == (stats["prompt_decoded"]
                                                             + stats["prompt_reused"])
        assert value(end, "lollms_prompt_tokens_reused_total") == stats["prompt_reused"] > 0
        assert value(end, "lollms_time_to_first_token_seconds_count") == 2
        assert value(end, "lollms_inter_token_seconds_count") == 10  # 5 gaps per answer
        assert value(end, "lollms_request_duration_seconds_count") == 2
        assert value(end, "lollms_time_to_first_token_seconds_bucket", le="+Inf") == 2
        assert value(end, "lollms_queue_length") == 0
        assert value(end, "lollms_slots", state="idle") == 2

        # a refused answer (a second one while the first runs) counts as an error
        await b.sio.emit("generate_msg", {"prompt": "x" * 10})
        await b.sio.emit("generate_msg", {"prompt": "y"})
        finals = [await asyncio.wait_for(b.finals.get(), 10) for _ in range(2)]
        assert sorted(f["finish_reason"] for f in finals) == ["error", "stop"]
        after = await scrape(b.http)
        assert value(after, "lollms_requests_total", finish_reason="error") == 1
        assert value(after, "lollms_requests_total", finish_reason="stop") == 3
    finally:
        gate.release(10_000)
        await b.close()


@pytest.mark.slow
async def test_metrics_on_the_real_model(aiohttp_server: Factory,
                                         make_config: Callable[..., Config]) -> None:
    app = build_app(make_config())
    server = await aiohttp_server(app)
    b = await Browser.open(str(server.make_url("")).rstrip("/"))
    try:
        await b.get("/new_discussion", title="metrics")
        final = await b.generate("Name three colours.")
        got = await scrape(b.http)
        engine = app[ENGINE_CONTROL].current
        assert engine is not None
        stats = engine.stats()
        assert value(got, "lollms_generated_tokens_total") == stats["generated"] > 0
        assert value(got, "lollms_requests_total",
                     finish_reason=final["finish_reason"]) == 1
        assert value(got, "lollms_time_to_first_token_seconds_count") == 1
        assert value(got, "lollms_inter_token_seconds_count") == stats["generated"] - 1
        assert value(got, "lollms_time_to_first_token_seconds_sum") > 0
    finally:
        await b.close()


async def test_access_log_is_off_by_default_and_never_logs_secrets(
        aiohttp_client: Any, make_config: Callable[..., Config],
        caplog: pytest.LogCaptureFixture) -> None:
    quiet = await aiohttp_client(build_app(make_config(), backend_factory=None))
    with caplog.at_level("INFO", logger="lollms_fast.access"):
        await quiet.get("/list_discussions")
    assert not [r for r in caplog.records if r.name == "lollms_fast.access"]

    client = await aiohttp_client(build_app(make_config(access_log=True, api_key="s3cret"),
                                            backend_factory=None))
    with caplog.at_level("INFO", logger="lollms_fast.access"):
        await client.get("/update_message", params={"id": 1, "message": "private text"},
                         headers={"X-API-Key": "s3cret"})
        await client.post("/edit_title", json={"id": 1, "title": "private title"},
                          headers={"Authorization": "Bearer s3cret"})
        await client.get("/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "lollms_fast.access"]
    assert len(lines) == 3
    assert "GET /update_message" in lines[0] and "POST /edit_title 404" in lines[1]
    assert " 404 " in lines[2]
    text = "\n".join(lines)
    assert "s3cret" not in text and "private" not in text
