"""A bench run: N clients share M requests (each takes the next one until all are taken).

- `api="openai"`: every request is one streamed POST to `/v1/completions` or
  `/v1/chat/completions` on one shared connection pool.
- `api="lollms"`: each client is a `LollmsClient` (its own cookie session and Socket.IO
  connection); each request opens a new discussion, then `generate_msg`. The 2023 protocol
  has no per-request parameters, so the sampling options given on the command line are set
  with `update_setting` (in memory, never saved) for the run, with
  `override_personality_model_parameters` on (else the personality's values win), and set
  back to the values read from `/get_config` afterwards.

A failed request (refused connection, HTTP error, an error event or `final`, a timeout) is
counted with its message and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .clients import LollmsClient, Stream, openai_body, openai_stream
from .report import Progress, Result, count_tokens, summarize

DEFAULT_PROMPT = "Write a long story about a dragon who learns to fly."
# command-line sampling option -> (OpenAI body field, lollms setting)
SAMPLING = {
    "temperature": ("temperature", "temperature"),
    "top_k": ("top_k", "top_k"),
    "top_p": ("top_p", "top_p"),
    "repeat_penalty": ("repeat_penalty", "repeat_penalty"),
    "seed": ("seed", "seed"),
}
LOLLMS_OVERRIDE = "override_personality_model_parameters"
LOLLMS_OK = ("stop", "length")  # the other finish reasons (error, cancelled) are failures


class BenchError(Exception):
    """The run cannot start (bad options, a setting the server refuses)."""


@dataclass
class BenchOptions:
    url: str
    api: str = "openai"  # "openai" | "lollms"
    clients: int = 1
    requests: int = 1
    max_tokens: int = 128
    prompts: list[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    sampling: dict[str, float | int] = field(default_factory=dict)  # only the given ones
    model: str | None = None
    api_key: str | None = None
    endpoint: str = "completions"  # "completions" | "chat" (openai)
    timeout: float = 300.0  # per request
    progress: bool = True

    def check(self) -> None:
        if self.api not in ("openai", "lollms"):
            raise BenchError(f"unknown API {self.api!r}: openai or lollms")
        if self.endpoint not in ("completions", "chat"):
            raise BenchError(f"unknown endpoint {self.endpoint!r}: completions or chat")
        if self.clients < 1 or self.requests < 1 or self.max_tokens < 1:
            raise BenchError("--clients, --requests and --max-tokens must be at least 1")
        if self.timeout <= 0:
            raise BenchError("--timeout must be positive")
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise BenchError("the prompts must be non-empty strings")
        unknown = set(self.sampling) - set(SAMPLING)
        if unknown:
            raise BenchError(f"unknown sampling options: {sorted(unknown)}")
        if not self.url.startswith(("http://", "https://")):
            raise BenchError(f"--url must start with http:// or https://, not {self.url!r}")


def load_prompts(path: Path) -> list[str]:
    """A JSON file holding a list of prompts (strings, or objects with a "prompt")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read the prompts file {path}: {exc}") from None
    if not isinstance(data, list) or not data:
        raise BenchError(f"{path}: expected a non-empty JSON list of prompts")
    prompts = [p.get("prompt") if isinstance(p, dict) else p for p in data]
    if not all(isinstance(p, str) and p for p in prompts):
        raise BenchError(f"{path}: every prompt must be a non-empty string "
                         "(or an object with one in \"prompt\")")
    return [str(p) for p in prompts]


def _failure(t_send: float, exc: BaseException) -> Stream:
    text = str(exc) or ("no answer within the timeout"
                        if isinstance(exc, asyncio.TimeoutError) else "")
    return Stream(t_send=t_send, t_end=time.perf_counter(),
                  error=f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class Run:
    def __init__(self, opts: BenchOptions) -> None:
        self.opts = opts
        self.next_index = 0
        self.results: list[Result] = []
        self.progress = Progress(opts.requests, enabled=opts.progress)
        self.settings_applied: dict[str, Any] = {}
        self.notes: list[str] = []

    def take(self) -> int | None:
        """The next request for a free client, or None when all M are taken."""
        if self.next_index >= self.opts.requests:
            return None
        self.next_index += 1
        return self.next_index - 1

    def record(self, index: int, s: Stream) -> None:
        tokens, exact = count_tokens(s)
        result = Result(index, index % len(self.opts.prompts), s, tokens, exact)
        self.results.append(result)
        self.progress.update(result.ok)

    def prompt(self, index: int) -> str:
        return self.opts.prompts[index % len(self.opts.prompts)]

    # ------------------------------------------------------------ openai

    async def openai(self) -> float:
        opts = self.opts
        headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        sampling = {SAMPLING[k][0]: v for k, v in opts.sampling.items()}
        # a new connection per request: llama-server closes its end after each streamed
        # answer, and a request sent on such a pooled connection fails ("Can not write
        # request body"), which is the client's fault, not the server's
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        # no session-wide timeout: --timeout bounds each request
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=None)) as http:
            model = opts.model or await self.served_model(http)
            if model:
                self.settings_applied["model"] = model

            async def client() -> None:
                while (i := self.take()) is not None:
                    body = openai_body(opts.endpoint, self.prompt(i), opts.max_tokens,
                                       sampling, model)
                    t_send = time.perf_counter()
                    try:
                        s = await asyncio.wait_for(
                            openai_stream(http, opts.url, body, endpoint=opts.endpoint),
                            opts.timeout)
                    except Exception as exc:  # a timeout, or anything unforeseen
                        s = _failure(t_send, exc)
                    if not s.error and not s.finish_reason:
                        # the last choice chunk carries one; llama-cpp-python's server ends
                        # an answer a newer request interrupts with [DONE] and none
                        s.error = "the stream ended without a finish_reason (cut short)"
                    self.record(i, s)

            return await self.timed([client() for _ in range(opts.clients)])

    async def served_model(self, http: aiohttp.ClientSession) -> str | None:
        """The first model of `/v1/models`, for servers that need a name (vLLM, Ollama);
        None if the server lists none (the request then names no model)."""
        try:
            async with http.get(self.opts.url.rstrip("/") + "/v1/models",
                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
            return str(body["data"][0]["id"])
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError,
                IndexError, TypeError):
            return None

    # ------------------------------------------------------------ lollms

    async def lollms(self) -> float:
        opts = self.opts
        restore = await self.apply_lollms_settings()
        try:
            clients: list[LollmsClient | None] = list(await asyncio.gather(
                *(self.open_lollms() for _ in range(opts.clients))))

            async def client(slot: int) -> None:
                while (i := self.take()) is not None:
                    c = clients[slot]
                    t_send = time.perf_counter()
                    try:
                        if c is None:
                            c = clients[slot] = LollmsClient(opts.url, opts.api_key)
                            await asyncio.wait_for(c.open(), opts.timeout)
                        await c.new_discussion()  # every request starts a discussion
                        s = await asyncio.wait_for(await c.start(self.prompt(i)),
                                                   opts.timeout)
                    except Exception as exc:  # any failure is one failed request
                        s = _failure(t_send, exc)
                    if not s.error and s.finish_reason not in LOLLMS_OK:
                        s.error = f"the answer ended with finish_reason {s.finish_reason!r}"
                    # an answer still running (timeout) or a lost connection: the next
                    # request reconnects (closing cancels the answer on the server)
                    if c is not None and (c.current is not None or not c.sio.connected):
                        await c.close()
                        clients[slot] = None
                    self.record(i, s)

            try:
                return await self.timed([client(k) for k in range(opts.clients)])
            finally:
                for c in clients:
                    if c is not None:
                        await c.close()
        finally:
            await self.set_lollms(restore)

    async def open_lollms(self) -> LollmsClient | None:
        """A connected client, or None (its first request then tries again and fails)."""
        c = LollmsClient(self.opts.url, self.opts.api_key)
        try:
            return await asyncio.wait_for(c.open(), self.opts.timeout)
        except Exception:  # counted on the client's first request
            await c.close()
            return None

    async def apply_lollms_settings(self) -> dict[str, Any]:
        """Set the run's sampling settings; the values to set back afterwards. An unreachable
        server is no error here (its requests will fail and be counted)."""
        wanted: dict[str, Any] = {"n_predict": self.opts.max_tokens}
        wanted.update({SAMPLING[k][1]: v for k, v in self.opts.sampling.items()})
        wanted[LOLLMS_OVERRIDE] = True
        try:
            async with self.lollms_http() as http:
                async with http.get("/get_config") as resp:
                    resp.raise_for_status()
                    current = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            self.notes.append(f"settings not applied: cannot read /get_config ({exc})")
            return {}
        restore = {k: current[k] for k in wanted
                   if isinstance(current, dict) and k in current and current[k] != wanted[k]}
        changes = {k: v for k, v in wanted.items()
                   if not isinstance(current, dict) or current.get(k) != v}
        try:
            await self.set_lollms(changes, fail=True)
        except BenchError:
            await self.set_lollms(restore)  # those that were set before the refusal
            raise
        self.settings_applied = wanted
        return restore

    def lollms_http(self) -> aiohttp.ClientSession:
        headers = {"X-API-Key": self.opts.api_key} if self.opts.api_key else None
        return aiohttp.ClientSession(base_url=self.opts.url.rstrip("/"), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=60))

    async def set_lollms(self, settings: dict[str, Any], fail: bool = False) -> None:
        """`POST /update_setting` for each; a refusal raises BenchError when `fail`, else
        becomes a note (setting values back after the run)."""
        if not settings:
            return
        async with self.lollms_http() as http:
            for name, value in settings.items():
                problem = ""
                try:
                    async with http.post("/update_setting", json={
                            "setting_name": name, "setting_value": value}) as resp:
                        reply = await resp.json(content_type=None)
                    if not (isinstance(reply, dict) and reply.get("status") is True):
                        problem = str(reply.get("error") if isinstance(reply, dict)
                                      else reply)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError,
                        ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem:
                    message = f"the server refused the setting {name}={value!r}: {problem}"
                    if fail:
                        raise BenchError(message)
                    self.notes.append(message)

    # ------------------------------------------------------------ both

    async def timed(self, clients: Sequence[Any]) -> float:
        """Run the clients; the wall time from the start to the last answer's end."""
        t0 = time.perf_counter()
        await asyncio.gather(*clients)
        ends = [r.stream.t_end for r in self.results if r.stream.t_end]
        return (max(ends) if ends else time.perf_counter()) - t0

    def config(self) -> dict[str, Any]:
        o = self.opts
        out: dict[str, Any] = {
            "url": o.url, "api": o.api, "endpoint": o.endpoint if o.api == "openai" else None,
            "clients": o.clients, "requests": o.requests, "max_tokens": o.max_tokens,
            "prompts": len(o.prompts), "sampling": dict(o.sampling), "model": o.model,
            "api_key": bool(o.api_key), "timeout_s": o.timeout,
        }
        if o.api == "lollms":
            out["server_settings"] = self.settings_applied
        elif "model" in self.settings_applied:
            out["model"] = self.settings_applied["model"]
        return out


async def run(opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; the report (`report.summarize`'s shape)."""
    opts.check()
    r = Run(opts)
    r.progress.draw()
    try:
        wall = await (r.lollms() if opts.api == "lollms" else r.openai())
    finally:
        r.progress.close()
    results = sorted(r.results, key=lambda x: x.index)
    report = summarize(results, wall, r.config())
    report["notes"] = r.notes + report["notes"]
    return report

