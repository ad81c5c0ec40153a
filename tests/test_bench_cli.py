"""`lollms-fast bench`, the load generator in the package.

First without a model: the statistics, the server-sent-events parser (chunks cut anywhere,
comments, CR/LF variants, `[DONE]`, error objects), and whole runs against a small fake
OpenAI server (concurrency, request bodies, failures counted). Then, marked slow, the real
command against a live `lollms-fast serve` on the real default model, in both modes.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from chatkit import COUNT_PROMPT, free_port, install_counter_personality, server_process
from lollms_fast.bench import (
    BenchOptions,
    Progress,
    Result,
    SSEEvent,
    SSEParser,
    Stream,
    openai_stream,
    percentile,
    run,
    summarize,
    table,
)
from lollms_fast.bench.clients import StreamReader
from lollms_fast.cli import main as cli_main

SCRIPT = Path(sys.executable).parent / "lollms-fast"
Factory = Any

# ---------------------------------------------------------------- statistics


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.01) == 7.0 and percentile([7.0], 0.99) == 7.0
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0


def answer(t_send: float, times: list[float], *, usage: int | None = None,
           error: str = "", finish: str = "length") -> Stream:
    s = Stream(t_send=t_send, usage_tokens=usage, error=error, finish_reason=finish)
    for t in times:
        s.add_piece("x", t)
    s.t_end = (times[-1] if times else t_send) + 0.001
    return s


def results(*streams: Stream) -> list[Result]:
    from lollms_fast.bench.report import count_tokens

    out = []
    for i, s in enumerate(streams):
        tokens, exact = count_tokens(s)
        out.append(Result(i, 0, s, tokens, exact))
    return out


def test_summary_figures() -> None:
    # A: sent at 0, pieces at 0.1, 0.2, 0.4 (3 tokens); B: sent at 0, usage says 5 tokens
    # over pieces at 0.3 and 0.5; C failed twice with the same message, D with another
    a = answer(0.0, [0.1, 0.2, 0.4])
    b = answer(0.0, [0.3, 0.5], usage=5)
    failed = [answer(0.0, [], error="HTTP 500: boom", finish="") for _ in range(2)]
    other = answer(0.0, [], error="refused", finish="")
    report = summarize(results(a, b, *failed, other), wall_s=2.0, config={})
    assert report["requests"] == 5 and report["done"] == 2
    assert report["errors"] == {"count": 3, "first": ["HTTP 500: boom", "refused"]}
    assert report["tokens"] == 8 and report["token_count"] == "mixed"
    assert report["aggregate_tok_s"] == 4.0  # 8 tokens / 2 s
    # per stream: A (3 - 1) / 0.3 s = 6.67, B (5 - 1) / 0.2 s = 20: median (nearest rank)
    assert report["stream_tok_s"]["p50"] == pytest.approx(6.67, abs=0.01)
    assert report["ttft_ms"] == {"p50": 100.0, "p99": 300.0}
    # gaps pooled: 0.1, 0.2 (A) and 0.2 (B)
    assert report["gap_ms"]["p50"] == pytest.approx(200.0)
    assert report["gap_ms"]["p99"] == pytest.approx(200.0)
    assert report["finish_reasons"] == {"length": 2}
    assert [r["tokens_exact"] for r in report["per_request"][:2]] == [False, True]
    assert any("estimated from pieces" in n for n in report["notes"])
    text = table({**report, "config": {"url": "u", "api": "lollms", "clients": 1,
                                       "requests": 5, "max_tokens": 8}})
    assert "2 / 5" in text and "HTTP 500: boom" in text and "4.0 tok/s" in text


def test_summary_token_count_labels_and_empty_runs() -> None:
    exact = summarize(results(answer(0.0, [0.1, 0.2], usage=2)), 1.0, {})
    assert exact["token_count"] == "usage" and not exact["notes"]
    pieces = summarize(results(answer(0.0, [0.1, 0.2])), 1.0, {})
    assert pieces["token_count"] == "pieces" and pieces["notes"]
    nothing = summarize(results(answer(0.0, [], error="down", finish="")), 0.5, {})
    assert nothing["token_count"] == "none" and nothing["tokens"] == 0
    assert nothing["ttft_ms"] == {"p50": None, "p99": None}
    assert nothing["stream_tok_s"] == {"p50": None}
    many = summarize(results(*(answer(0.0, [], error=f"e{i}", finish="")
                               for i in range(9))), 1.0, {})
    assert many["errors"]["count"] == 9 and many["errors"]["first"] == [
        "e0", "e1", "e2", "e3", "e4"]


def test_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = Progress(4, out=out)
    bar.update(True)
    bar.update(False)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r[") and "2/4 requests, 1 errors" in text
    assert "#" * 15 + "." * 15 in text and text.endswith("\n")
    for enabled, stream in ((True, io.StringIO()), (False, Tty())):
        quiet = Progress(4, enabled=enabled, out=stream)
        quiet.update(True)
        quiet.close()
        assert stream.getvalue() == ""


# ---------------------------------------------------------------- server-sent events

STREAM = (
    b": a comment line, ignored\r\n"
    b"data: {\"n\": 1}\r\n\r\n"
    b"event: custom\n"
    b"data: first line\n"
    b"data:second line\n\n"
    b"data: caf\xc3\xa9\r\r"  # a lone CR ends lines too; a UTF-8 character in the data
    b"retry: 100\n"
    b"id: 5\n\n"  # no data: no event
    b"error: {\"message\": \"llama.cpp style\"}\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent("message", '{"n": 1}'),
    SSEEvent("custom", "first line\nsecond line"),
    SSEEvent("message", "café"),
    SSEEvent("error", '{"message": "llama.cpp style"}'),
    SSEEvent("message", "[DONE]"),
]


def parse(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events = [e for c in chunks for e in parser.feed(c)]
    return events + parser.close()


def test_sse_parser_whole_and_cut_anywhere() -> None:
    assert parse([STREAM]) == EXPECTED
    for cut in range(1, len(STREAM)):  # every two-chunk split, CR/LF pairs included
        assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut
    assert parse([STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_sse_parser_end_of_stream() -> None:
    assert parse([b"data: last, without its blank line"]) == [
        SSEEvent("message", "last, without its blank line")]
    assert parse([b"data: x\r"]) == [SSEEvent("message", "x")]
    assert parse([b""]) == [] and parse([b"\n\n: only a comment\n"]) == []


def feed_reader(*data: str | SSEEvent) -> tuple[Stream, StreamReader]:
    s = Stream(t_send=0.0)
    reader = StreamReader(s)
    for d in data:
        reader.event(d if isinstance(d, SSEEvent) else SSEEvent("message", d))
    return s, reader


def test_stream_reader_completions_chat_usage_done() -> None:
    def chunk(text: str, finish: str | None = None) -> str:
        return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})

    s, reader = feed_reader(
        chunk("Hello"), chunk(""),  # an empty piece is no piece
        chunk(" world", "length"),
        '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}',
        "[DONE]", chunk("late"))  # after [DONE]: ignored
    assert reader.done and not s.error
    assert s.text == "Hello world" and s.pieces == 2 and s.usage_tokens == 2
    assert s.finish_reason == "length"
    s, reader = feed_reader(
        '{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}',
        '{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}',
        '{"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}',
        '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', "[DONE]")
    assert s.text == "Hihmm" and s.pieces == 2 and s.usage_tokens is None
    assert s.finish_reason == "stop" and s.t_first > 0


@pytest.mark.parametrize(("data", "event", "message"), [
    ('{"error": {"message": "context full", "type": "server_error"}}', "message",
     "context full"),
    ('{"error": "plain text"}', "message", "plain text"),
    ('{"message": "llama.cpp"}', "error", "llama.cpp"),
    ("not json", "message", "not JSON"),
])
def test_stream_reader_errors(data: str, event: str, message: str) -> None:
    s, _ = feed_reader('{"choices": [{"index": 0, "text": "a"}]}', SSEEvent(event, data),
                       '{"choices": [{"index": 0, "text": "b"}]}')
    assert message in s.error
    assert s.text == "a"  # nothing after the error


# ---------------------------------------------------------------- a fake OpenAI server


class FakeOpenAI:
    """Streams `words` one SSE event per token, with usage when asked; records the bodies,
    headers and the most requests in flight at once."""

    def __init__(self, words: int = 4) -> None:
        self.words = words
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.in_flight = self.most_in_flight = 0
        self.fail_every = 0  # every n-th request answers 500
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.complete)
        self.app.router.add_post("/v1/chat/completions", self.complete)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error",
                                                "param": None, "code": None}}, status=503)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chat = "messages" in body
            for i in range(self.words):
                await asyncio.sleep(0.01)
                last = i == self.words - 1
                choice: dict[str, Any] = {"index": 0,
                                          "finish_reason": "length" if last else None}
                if chat:
                    choice["delta"] = {"content": f" w{i}"}
                else:
                    choice["text"] = f" w{i}"
                raw = b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"
                await resp.write(raw[:7])  # every event cut in two writes
                await resp.write(raw[7:])
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 2, "completion_tokens": self.words,
                         "total_tokens": self.words + 2}
                await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage})
                                 .encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
async def fake(aiohttp_server: Factory) -> tuple[FakeOpenAI, str]:
    server = FakeOpenAI()
    srv = await aiohttp_server(server.app)
    return server, str(srv.make_url("")).rstrip("/")


async def test_a_run_shares_the_requests_among_concurrent_clients(
        fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    report = await run(BenchOptions(url=url, api="openai", clients=3, requests=7,
                                    max_tokens=4, prompts=["p0", "p1"],
                                    sampling={"temperature": 0.0, "top_k": 5},
                                    api_key="sekrit", progress=False))
    assert report["requests"] == 7 and report["done"] == 7
    assert report["errors"] == {"count": 0, "first": []}
    assert report["token_count"] == "usage" and report["tokens"] == 28
    assert [r["prompt"] for r in report["per_request"]] == [0, 1, 0, 1, 0, 1, 0]
    assert server.most_in_flight == 3
    assert sorted(b["prompt"] for b in server.bodies) == ["p0"] * 4 + ["p1"] * 3
    body = server.bodies[0]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and body["temperature"] == 0.0 and body["top_k"] == 5
    assert "top_p" not in body and "seed" not in body  # not given: the server's defaults
    assert set(server.auth) == {"Bearer sekrit"}
    assert report["config"]["model"] == "fake-model" and report["config"]["api_key"] is True
    assert "sekrit" not in json.dumps(report)
    assert report["aggregate_tok_s"] > 0 and report["gap_ms"]["p50"] is not None


async def test_chat_endpoint_and_counted_failures(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    server.fail_every = 2
    report = await run(BenchOptions(url=url, api="openai", clients=2, requests=4,
                                    max_tokens=4, endpoint="chat", model="mine",
                                    progress=False))
    assert server.bodies[0]["messages"] == [{"role": "user", "content":
                                             server.bodies[0]["messages"][0]["content"]}]
    assert {b["model"] for b in server.bodies} == {"mine"}
    assert report["done"] == 2 and report["errors"]["count"] == 2
    assert report["errors"]["first"] == ["HTTP 503: overloaded"]
    assert report["tokens"] == 8


async def test_truncated_and_refused_streams_are_errors(aiohttp_server: Factory) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        return resp  # neither a finish_reason nor [DONE]

    async def no_finish(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/cut/v1/completions", cut)
    app.router.add_post("/interrupted/v1/completions", no_finish)
    srv = await aiohttp_server(app)
    base = str(srv.make_url("")).rstrip("/")
    import aiohttp

    async with aiohttp.ClientSession() as http:
        s = await openai_stream(http, base + "/cut", {"prompt": "x"})
        assert s.error == "the event stream ended before [DONE]" and s.text == "a"
        s = await openai_stream(http, f"http://127.0.0.1:{free_port()}", {"prompt": "x"})
        assert "ClientConnectorError" in s.error
    report = await run(BenchOptions(url=base + "/interrupted", clients=1, requests=2,
                                    model="m", progress=False))
    assert report["done"] == 0 and report["errors"]["count"] == 2
    assert "without a finish_reason" in report["errors"]["first"][0]


def test_cli_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--url", "localhost:9600"]) == 2
    assert "http://" in capsys.readouterr().err
    bad = tmp_path / "prompts.json"
    bad.write_text('{"not": "a list"}')
    assert cli_main(["bench", "--url", "http://127.0.0.1:1", "--prompts", str(bad)]) == 2
    assert "list of prompts" in capsys.readouterr().err
    assert cli_main(["bench", "--url", "http://127.0.0.1:1", "--clients", "0"]) == 2


def test_cli_counts_a_refused_connection(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    port = free_port()
    for api in ("openai", "lollms"):
        rc = cli_main(["bench", "--url", f"http://127.0.0.1:{port}", "--api", api,
                       "--clients", "2", "--requests", "3", "--json", str(out),
                       "--no-progress"])
        report = json.loads(out.read_text())
        assert rc == 1 and report["done"] == 0 and report["errors"]["count"] == 3, report
        assert "Cannot connect" in report["errors"]["first"][0]


# ---------------------------------------------------------------- live server (real model)

KEY = "bench-test-key"
OPENAI_PROMPT = "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory,
                default_model_path: Path) -> Iterator[str]:
    """One real server for the module: the counting personality (answers that cannot end
    before n_predict), two slots, an API key."""
    data = tmp_path_factory.mktemp("bench") / "data"
    data.mkdir()
    install_counter_personality(data)
    (data / "local_config.yaml").write_text("personality: counter\n")
    with server_process(data, default_model_path, "--n-threads", "2",
                        "--parallel", "2", "--ctx-size", "1024", "--api-key", KEY) as base:
        yield base


def bench(*args: str, script: bool = False) -> tuple[int, dict[str, Any], str]:
    """Run the installed command; its exit status, JSON report and stdout."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = ([str(SCRIPT)] if script else [sys.executable, "-m", "lollms_fast"])
        done = subprocess.run([*cmd, "bench", *args, "--json", str(out)],
                              capture_output=True, text=True, timeout=240)
        assert out.exists(), done.stderr
        return done.returncode, json.loads(out.read_text()), done.stdout


def server_get(base: str, path: str) -> bytes:
    request = urllib.request.Request(base + path, headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return bytes(resp.read())


def generated_tokens(base: str) -> float:
    for line in server_get(base, "/metrics").decode().splitlines():
        if line.startswith("lollms_generated_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no lollms_generated_tokens_total in /metrics")


COMMON = ("--clients", "2", "--requests", "4", "--max-tokens", "8", "--temperature", "0",
          "--repeat-penalty", "1.0", "--api-key", KEY)


@pytest.mark.slow
def test_bench_lollms_mode_on_a_live_server(live_server: str) -> None:
    before = json.loads(server_get(live_server, "/get_config"))
    tokens_before = generated_tokens(live_server)
    rc, report, stdout = bench("--url", live_server, "--api", "lollms", "--prompt",
                               COUNT_PROMPT, *COMMON, script=True)
    assert rc == 0, report
    assert report["requests"] == 4 and report["done"] == 4
    assert report["errors"] == {"count": 0, "first": []}
    # `final` carries no token count: the report counts pieces and says so; the server's
    # own counter has the exact number, 4 answers x n_predict 8 (a piece carries >= 1)
    assert report["token_count"] == "pieces"
    assert any("tokens estimated from pieces" in n for n in report["notes"])
    assert "estimated from pieces" in stdout and "requests done" in stdout
    assert generated_tokens(live_server) - tokens_before == 4 * 8
    for r in report["per_request"]:
        assert r["ok"] and r["finish_reason"] == "length", r
        assert 1 <= r["pieces"] <= 8 and r["tokens"] == r["pieces"], r
    assert report["tokens"] == sum(r["tokens"] for r in report["per_request"])
    assert report["ttft_ms"]["p50"] > 0 and report["aggregate_tok_s"] > 0
    assert report["config"]["server_settings"] == {
        "n_predict": 8, "temperature": 0.0, "repeat_penalty": 1.0,
        "override_personality_model_parameters": True}
    after = json.loads(server_get(live_server, "/get_config"))
    assert after == before  # the run's settings were set back


@pytest.mark.slow
def test_bench_openai_mode_on_a_live_server(live_server: str) -> None:
    rc, report, _ = bench("--url", live_server, "--api", "openai", "--prompt", OPENAI_PROMPT,
                          *COMMON)
    assert rc == 0, report
    assert report["requests"] == 4 and report["done"] == 4
    assert report["errors"]["count"] == 0
    assert report["token_count"] == "usage" and report["tokens"] == 4 * 8
    for r in report["per_request"]:
        assert r["tokens_exact"] and r["tokens"] == 8 and r["finish_reason"] == "length", r
        assert 1 <= r["pieces"] <= 8
    rc, report, _ = bench("--url", live_server, "--endpoint", "chat", "--prompt",
                          "Count from 1 to 100.", "--requests", "2", "--clients", "2",
                          "--max-tokens", "8", "--temperature", "0", "--api-key", KEY)
    assert rc == 0 and report["done"] == 2 and report["token_count"] == "usage", report
    assert all(1 <= r["tokens"] <= 8 for r in report["per_request"])


@pytest.mark.slow
@pytest.mark.parametrize("api", ["lollms", "openai"])
def test_bench_without_the_key_counts_every_request_as_an_error(live_server: str,
                                                               api: str) -> None:
    rc, report, _ = bench("--url", live_server, "--api", api, "--clients", "2",
                          "--requests", "3", "--max-tokens", "8", "--no-progress")
    assert rc == 1 and report["done"] == 0 and report["errors"]["count"] == 3, report
    assert "401" in report["errors"]["first"][0]
