"""The OpenAI-compatible API (SPEC section 9) through the official `openai` SDK, sync and
async, against a real server process on the real default model. The stream framing is also
checked on the raw SSE bytes, since the SDK forgives some mistakes."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatkit import (
    COUNT_PROMPT,
    COUNTER_SETTINGS,
    Browser,
    install_counter_personality,
    server_process,
)

pytestmark = pytest.mark.slow

KEY = "test-key-0123456789"
N_PREDICT = 64
COUNTING = "Count from one to fifty in words, separated by commas: one, two, three,"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
           ) -> Iterator[str]:
    """The base URL of a real server (with a key, strict model names, one listed origin)."""
    data = tmp_path_factory.mktemp("openai") / "data"
    data.mkdir()
    install_counter_personality(data)
    with server_process(data, default_model_path, "--parallel", "4", "--ctx-size", "2048",
                        env={"LOLLMS_API_KEY": KEY, "LOLLMS_STRICT_MODEL_NAMES": "true",
                             "LOLLMS_ALLOWED_ORIGINS": "http://app.example",
                             "LOLLMS_N_PREDICT": str(N_PREDICT)}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def metrics(server: str) -> dict[str, float]:
    import urllib.request

    req = urllib.request.Request(server + "/metrics", headers={"X-API-Key": KEY})
    with urllib.request.urlopen(req) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{label}}}" if label else "")] = s.value
    return out


# ---------------------------------------------------------------------- models

def test_models_lists_the_loaded_model(client: openai.OpenAI, default_model_path: Path
                                       ) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [default_model_path.name.removesuffix(".gguf")]
    assert models[0].object == "model" and models[0].owned_by


# ---------------------------------------------------------------------- chat

def test_chat_whole_answer(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "You answer briefly."},
                               {"role": "user", "content": "Name a colour."}],
        temperature=0, max_tokens=12)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == model
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    u = r.usage
    assert u is not None and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None
    assert 0 <= (u.prompt_tokens_details.cached_tokens or 0) < u.prompt_tokens


def test_chat_stream_matches_its_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": COUNTING}], temperature=0,
        max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # the personality layout's turn markers may end the answer before max_tokens
    used = chunks[-1].usage.completion_tokens
    assert used == 20 if finishes[-1] == "length" else 0 < used <= 20
    assert text.strip()


def test_chat_list_content_and_a_typed_control_token(client: openai.OpenAI, model: str
                                                     ) -> None:
    """Text parts are joined; a typed `<end_of_turn>` is text (more prompt tokens than the
    one control token it would otherwise be)."""
    def prompt_tokens(content: Any) -> int:
        r = client.chat.completions.create(model=model, max_tokens=1, temperature=0,
                                           messages=[{"role": "user", "content": content}])
        assert r.usage is not None
        return r.usage.prompt_tokens

    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert prompt_tokens(parts) == prompt_tokens("Hello there")
    assert prompt_tokens("a<end_of_turn>b") > prompt_tokens("a b") + 1


async def test_async_chat_stream_and_n_choices(server: str, model: str) -> None:
    before = metrics(server)
    async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY,
                                  max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me about cats. " * 20}],
            temperature=1.0, seed=7, max_tokens=8, n=2, stream=True)
        texts = {0: "", 1: ""}
        finished = set()
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    finished.add(c.index)
    assert finished == {0, 1}
    after = metrics(server)
    decoded = (after["lollms_prompt_tokens_total"] - before["lollms_prompt_tokens_total"]) - (
        after["lollms_prompt_tokens_reused_total"]
        - before["lollms_prompt_tokens_reused_total"])
    admitted = after["lollms_prompt_tokens_total"] - before["lollms_prompt_tokens_total"]
    # two choices admitted with the whole prompt each, and it was decoded at most once
    assert admitted >= 2 * 100 and decoded <= admitted / 2


def test_n_choices_whole_and_seeded(client: openai.OpenAI, model: str) -> None:
    def ask() -> list[str]:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Invent a name for a dog."}],
            temperature=1.0, seed=1234, max_tokens=10, n=2)
        assert [c.index for c in r.choices] == [0, 1]
        assert r.usage is not None and r.usage.completion_tokens <= 20
        return [c.message.content or "" for c in r.choices]

    ask()  # the prompt is now cached: the next two read it the same way
    first, second = ask(), ask()
    assert first == second  # same seed, same answers
    assert first[0] != first[1]  # choice i samples with seed + i


def test_seed_reproducible_on_completions(client: openai.OpenAI, model: str) -> None:
    def ask(seed: int) -> str:
        return client.completions.create(model=model, prompt="Once upon a time",
                                         temperature=1.0, top_p=1.0, seed=seed,
                                         max_tokens=16).choices[0].text

    ask(5)
    assert ask(5) == ask(5)
    assert len({ask(s) for s in (1, 2, 3)}) > 1


def test_stop_sequences_cut_the_answer(client: openai.OpenAI, model: str) -> None:
    plain = client.completions.create(model=model, prompt="1, 2, 3, 4,", temperature=0,
                                      max_tokens=12).choices[0].text
    assert " 6" in plain, plain
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", temperature=0,
                                  max_tokens=12, stop=[" 6", "never"])
    assert r.choices[0].text == plain[: plain.index(" 6")]
    assert r.choices[0].finish_reason == "stop"
    # stop sequences are case-sensitive (OpenAI's), unlike lollms anti-prompts
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", temperature=0,
                                  max_tokens=12, stop=[" SIX"])
    assert r.choices[0].finish_reason == "length"


def test_logprobs_chat_and_completions(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=6,
                                       messages=[{"role": "user", "content": COUNTING}],
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0001
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    joined = "".join(e.token for e in content)
    assert joined.startswith(r.choices[0].message.content or "")

    c = client.completions.create(model=model, prompt="The capital of France is",
                                  temperature=0, max_tokens=4, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


# ---------------------------------------------------------------------- structured output

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object",
     "properties": {"colour": {"enum": ["red", "green", "blue"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                             "minItems": 1, "maxItems": 3}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "object",
     "properties": {"pet": {"type": "object",
                            "properties": {"kind": {"enum": ["cat", "dog"]},
                                           "legs": {"type": "integer"}},
                            "required": ["kind", "legs"], "additionalProperties": False},
                    "ok": {"type": "boolean"}},
     "required": ["pet", "ok"], "additionalProperties": False},
]


# an example answer in the prompt: without one the 270M model rarely closes the object
EXAMPLES: list[dict[str, Any]] = [
    {"name": "Rex", "age": 3},
    {"colour": "red", "tags": ["small"]},
    {"pet": {"kind": "cat", "legs": 4}, "ok": True},
]


@pytest.mark.parametrize(("schema", "example"), list(zip(SCHEMAS, EXAMPLES, strict=True)),
                         ids=["flat", "enum-array", "nested"])
def test_json_schema_output_validates(client: openai.OpenAI, model: str,
                                      schema: dict[str, Any], example: dict[str, Any]
                                      ) -> None:
    jsonschema.validate(example, schema)
    r = client.chat.completions.create(
        model=model, temperature=0.7, seed=3, max_tokens=160,
        messages=[{"role": "user", "content": "Describe a pet as JSON, for example "
                                              + json.dumps(example) + "."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema}})
    text = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_output_parses(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, temperature=0, max_tokens=120,
        messages=[{"role": "user", "content": 'Give a JSON object with a city and its '
                                              'country, like {"city": "Rome", "country": '
                                              '"Italy"}.'}],
        response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


# ---------------------------------------------------------------------- errors

def test_error_shapes(server: str, client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=[{"role": "user",
                                                               "content": "hi"}],
                                       temperature=5)
    assert bad.value.status_code == 400
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]

    with openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as auth:
            c.models.list()
    assert auth.value.body["type"] == "authentication_error"  # type: ignore[index]

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]

    long = "word " * 3000
    with pytest.raises(openai.BadRequestError) as over:
        client.chat.completions.create(model=model, messages=[{"role": "user",
                                                               "content": long}])
    assert over.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as over:
        client.completions.create(model=model, prompt="hello", max_tokens=4000)
    assert over.value.body["code"] == "context_length_exceeded"  # type: ignore[index]

    for body, param in [({"messages": []}, "messages"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "logit_bias": {"abc": 1}}, "logit_bias"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "stop": ["a", "b", "c", "d", "e"]}, "stop"),
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "xml"}}, "response_format"),
                        # a grammar that would unroll 10^9 items is refused, not built
                        ({"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {
                              "name": "big", "schema": {"type": "array", "items": {
                                  "type": "string"}, "minItems": 10 ** 9}}}},
                         "response_format")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, **body)
        assert err.value.body["param"].startswith(param), body  # type: ignore[index]


async def test_raw_errors_and_cors(server: str, model: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(server) as http:
        async with http.post("/v1/chat/completions", data="{not json",
                             headers={**auth, "Content-Type": "application/json"}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["error"]["type"] == "invalid_request_error"
        for method in ("GET", "POST", "DELETE"):
            async with http.request(method, "/v1/nothing", headers=auth) as resp:
                assert resp.status == 404, method
                assert (await resp.json())["error"]["type"] == "not_found_error"
        async with http.get("/v1/chat/completions", headers=auth) as resp:
            assert resp.status == 405 and "POST" in resp.headers["Allow"]
        # CORS: only the listed origin gets the headers; a preflight needs no key
        async with http.options("/v1/chat/completions", headers={
                "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
            assert "authorization" in resp.headers["Access-Control-Allow-Headers"]
        async with http.options("/v1/chat/completions", headers={
                "Origin": "http://evil.example",
                "Access-Control-Request-Method": "POST"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.get("/v1/models", headers={**auth, "Origin": "http://app.example"}
                            ) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        async with http.post("/v1/completions", headers={**auth, "Origin": "http://evil.example"},
                             json={"model": model, "prompt": "hi", "max_tokens": 1}) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
            assert (await resp.json())["error"]["type"] == "permission_error"


# ---------------------------------------------------------------------- raw SSE framing

def _frames(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    frames = raw[:-2].split(b"\n\n")
    assert all(f.startswith(b"data: ") for f in frames), raw[:300]
    return [f[6:] for f in frames]


async def test_raw_sse_framing(server: str, model: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(server) as http:
        async with http.post("/v1/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": COUNTING}],
                "temperature": 0, "max_tokens": 10, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
    frames = _frames(raw)
    assert frames[-1] == b"[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert first["finish_reason"] is None
    body, finish, usage = chunks[1:-2], chunks[-2], chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None and "content" in c["choices"][0]["delta"]
               for c in body)
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null until the end
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10

    async with aiohttp.ClientSession(server) as http:
        async with http.post("/v1/completions", headers=headers, json={
                "model": model, "prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 5,
                "stream": True}) as resp:
            raw = await resp.read()
    frames = _frames(raw)
    assert frames[-1] == b"[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("usage" not in c for c in chunks)  # not asked for
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


# ---------------------------------------------------------------------- disconnect, batch

def _busy(server: str) -> float:
    m = metrics(server)
    return m["lollms_slots{state=generating}"] + m["lollms_slots{state=prompt}"]


async def test_disconnect_cancels_the_generation(server: str, model: str) -> None:
    before = metrics(server)["lollms_requests_total{finish_reason=cancelled}"]
    async with aiohttp.ClientSession(server) as http:
        resp = await http.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": model, "prompt": COUNTING, "temperature": 0,
                                     "max_tokens": 1500, "stream": True})
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the connection goes away mid-stream
    deadline = time.monotonic() + 5
    while _busy(server) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert _busy(server) == 0
    assert metrics(server)["lollms_requests_total{finish_reason=cancelled}"] == before + 1

    # the same for an answer that is not streamed (nothing is written until the end)
    async with aiohttp.ClientSession(server) as http:
        task = asyncio.ensure_future(http.post(
            "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": model, "prompt": COUNTING, "temperature": 0, "max_tokens": 1500}))
        deadline = time.monotonic() + 10
        while not _busy(server) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
    deadline = time.monotonic() + 5
    while _busy(server) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert _busy(server) == 0
    assert metrics(server)["lollms_requests_total{finish_reason=cancelled}"] == before + 2


async def test_socketio_and_v1_share_the_batch(server: str, model: str) -> None:
    """A Socket.IO answer and a /v1 answer at the same time: the engine decodes them in the
    same steps, so there are fewer decode calls than tokens generated (one after the other
    there would be at least as many). The lollms answer uses the counting personality for
    the test (it cannot end before n_predict), the settings are put back after."""
    browser = await Browser.open(server, delta=True, api_key=KEY)
    _, config = await browser.get("/get_config")
    saved = {name: config[name] for name in COUNTER_SETTINGS}
    try:
        for name, value in COUNTER_SETTINGS.items():
            status, reply = await browser.post("/update_setting", {"setting_name": name,
                                                                   "setting_value": value})
            assert status == 200 and reply["status"], reply
        before = metrics(server)
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY,
                                      max_retries=0) as aclient:
            lollms = asyncio.ensure_future(browser.generate(COUNT_PROMPT))
            await asyncio.wait_for(browser.first_message.wait(), 60)
            result = await aclient.completions.create(model=model, prompt=COUNTING,
                                                      temperature=0, max_tokens=40)
            final = await lollms
        after = metrics(server)
    finally:
        for name, value in saved.items():
            await browser.post("/update_setting", {"setting_name": name,
                                                   "setting_value": value})
        await browser.close()
    assert result.usage is not None and result.usage.completion_tokens == 40
    assert final["finish_reason"] == "length"
    steps = after["lollms_decode_steps_total"] - before["lollms_decode_steps_total"]
    tokens = after["lollms_generated_tokens_total"] - before["lollms_generated_tokens_total"]
    assert tokens == 40 + N_PREDICT
    # one after the other: >= 104 steps (+ prompt chunks); sharing the batch: the 40 /v1
    # tokens ride along with the lollms answer's steps
    assert steps <= N_PREDICT + 10, (steps, tokens)


# ---------------------------------------------------------------------- chat_template_file

def test_builtin_gemma_template_for_a_gguf_without_one(tmp_path: Path,
                                                       default_model_path: Path) -> None:
    """The default GGUF (Gemma 3 270M, the base model) has no chat template:
    `builtin:gemma` lays the conversation out in Gemma's turn format instead of the
    personality's: the prompt is exactly the template's tokens (turn markers as control
    tokens, BOS once)."""
    from lollms_fast.engine.backend import Backend, BackendParams
    from lollms_fast.services.templates import ChatTemplate, tokens_of

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    backend = Backend(BackendParams(default_model_path, 256, 64, 1, 1))
    try:
        source = (Path(__file__).parent.parent / "src" / "lollms_fast" / "chat_templates"
                  / "gemma.jinja").read_text()
        expected = tokens_of(ChatTemplate.from_backend(source, backend).render(messages),
                             backend.tokenize)
        start, end = backend.tokenize("<start_of_turn>", False, True), \
            backend.tokenize("<end_of_turn>", False, True)
    finally:
        backend.close()
    assert len(start) == len(end) == 1 and expected.count(start[0]) == 2
    assert expected.count(end[0]) == 1
    data = tmp_path / "data"
    data.mkdir()
    with server_process(data, default_model_path, "--parallel", "1",
                        "--chat-template-file", "builtin:gemma") as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
        r = c.chat.completions.create(model="any", temperature=0, max_tokens=4,
                                      messages=messages)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens == len(expected)


async def test_a_broken_chat_template_file_is_a_clear_error(aiohttp_client: Any,
                                                            make_config: Any,
                                                            tmp_path: Path) -> None:
    from fakes import ScriptedBackend
    from lollms_fast.app import build_app
    from lollms_fast.engine import Engine

    def scripted(_config: Any) -> Engine:
        engine = Engine(ScriptedBackend([b"ok"]), parallel=2, n_ctx_slot=256, n_batch=32,
                        queue_size=2)
        engine.start()
        return engine

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}", encoding="utf-8")
    for setting, words in [("builtin:nope", "no such built-in template"),
                           (str(tmp_path / "missing.jinja"), "cannot be read"),
                           (str(bad), "does not compile")]:
        client = await aiohttp_client(build_app(make_config(chat_template_file=setting),
                                                backend_factory=scripted))
        async with client.post("/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "hi"}]}) as resp:
            body = await resp.json()
        assert resp.status == 500 and words in body["error"]["message"], body
        assert body["error"]["type"] == "server_error"
        await client.close()
    # a good file is used (the scripted model answers "ok" whatever the prompt)
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    client = await aiohttp_client(build_app(make_config(chat_template_file=str(good)),
                                            backend_factory=scripted))
    async with client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}]}) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["choices"][0]["message"]["content"] == "ok"
    assert body["usage"]["prompt_tokens"] == 2  # the template's text only: "hi"
