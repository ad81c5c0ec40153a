"""Streaming clients that time every piece on arrival.

- `LollmsClient`: what a browser does with a lollms server: an HTTP session (its cookie)
  shared with a Socket.IO connection in delta mode (`?stream=delta`, so each `message`
  carries only the new text), `generate_msg {"prompt"}`, then `message`* and `final`.
- `openai_stream`: one streamed OpenAI completion (`/v1/completions` or
  `/v1/chat/completions`, `stream: true`), read as server-sent events with `SSEParser`.
  Works against any server speaking that API (lollms_fast, llama-server, llama-cpp-python,
  Ollama, vLLM).

Errors never raise out of one answer: they end it with `Stream.error` set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import socketio

PieceHook = Callable[["Stream"], None]

# how long a lollms answer whose `infos` reported an error waits for its `final` (the 2023
# server sends none after `model_not_ready`)
FINAL_GRACE_S = 5.0


@dataclass
class Stream:
    """One answer as a client saw it (perf_counter seconds)."""

    t_send: float
    t_first: float = 0.0  # first non-empty piece
    t_end: float = 0.0  # `final` / the end of the event stream
    piece_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    late_pieces: int = 0  # pieces of this answer received after its `final` (must be 0)
    n_tokens: int = 0  # left to the caller (benchmarks/run.py counts with the tokenizer)
    usage_tokens: int | None = None  # `usage.completion_tokens` of an OpenAI stream
    error: str = ""  # why the answer failed ("" when it did not)
    ai_message_id: int | None = None
    user_message_id: int | None = None

    @property
    def ttft(self) -> float:
        """Send -> first piece; an answer with no text at all counts its end."""
        return (self.t_first or self.t_end) - self.t_send

    @property
    def pieces(self) -> int:
        return len(self.piece_times)

    def gaps(self) -> list[float]:
        t = self.piece_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def add_piece(self, text: str, now: float) -> None:
        if not self.piece_times:
            self.t_first = now
        self.piece_times.append(now)
        self.text += text


# ------------------------------------------------------------------ lollms (Socket.IO)


class LollmsClient:
    """One browser-like client of a lollms server (cookie session + Socket.IO, delta mode).

    `api_key` goes in the `X-API-Key` header of every HTTP request and of the Socket.IO
    handshake, and in the Socket.IO `auth` payload."""

    def __init__(self, base: str, api_key: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.api_key = api_key
        headers = {"X-API-Key": api_key} if api_key else None
        # unsafe=True: keep cookies from an IP host (a server on 127.0.0.1)
        self.http = aiohttp.ClientSession(base_url=self.base, headers=headers,
                                          cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sio = socketio.AsyncClient(reconnection=False)
        self.current: Stream | None = None
        self.done: asyncio.Future[Stream] | None = None
        self.finished: list[Stream] = []  # ended answers, to catch pieces arriving late
        self.on_piece: PieceHook | None = None  # optional hook after every piece
        self.sio.on("message", self._message)
        self.sio.on("final", self._final)
        self.sio.on("infos", self._infos)
        self.sio.on("disconnect", self._disconnect)

    async def open(self) -> LollmsClient:
        async with self.http.get("/get_generation_status") as resp:  # sets the cookie
            resp.raise_for_status()
        headers = {}
        cookie = "; ".join(f"{c.key}={c.value}" for c in self.http.cookie_jar)
        if cookie:
            headers["Cookie"] = cookie
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        auth = {"api_key": self.api_key} if self.api_key else None
        await self.sio.connect(self.base + "?stream=delta", headers=headers, auth=auth,
                               transports=["websocket"], wait_timeout=20)
        return self

    async def new_discussion(self) -> int:
        async with self.http.get("/new_discussion") as resp:
            resp.raise_for_status()
            return int((await resp.json())["id"])

    async def load_discussion(self, discussion_id: int) -> list[dict[str, Any]]:
        """Also selects the discussion for this client's session (the 2023 behaviour)."""
        async with self.http.post("/load_discussion", json={"id": discussion_id}) as resp:
            resp.raise_for_status()
            return list(orjson.loads(await resp.read()))

    def _resolve(self, s: Stream) -> None:
        fut = self.done
        if self.current is s:
            self.current = None
            self.finished.append(s)
        if fut is not None and not fut.done():
            fut.set_result(s)

    async def _infos(self, data: Any = None) -> None:
        s = self.current
        if s is None or not isinstance(data, dict):
            return
        if data.get("status", "generation_started") == "generation_started":
            s.ai_message_id = data.get("ai_message_id")
            s.user_message_id = data.get("user_message_id")
            return
        s.error = str(data.get("error") or data.get("message") or data.get("status"))

        def no_final() -> None:  # the server reported an error and sent no `final`
            if self.current is s:
                s.t_end = time.perf_counter()
                self._resolve(s)
        asyncio.get_running_loop().call_later(FINAL_GRACE_S, no_final)

    async def _message(self, data: Any = None) -> None:
        now = time.perf_counter()
        s = self.current
        if not isinstance(data, dict):
            return
        if s is None or data.get("ai_message_id") != s.ai_message_id:
            for old in self.finished:  # a piece of an answer that already ended
                if data.get("ai_message_id") == old.ai_message_id:
                    old.late_pieces += 1
            return
        piece = str(data.get("data", ""))
        if not piece:
            return
        s.add_piece(piece, now)
        if self.on_piece is not None:
            self.on_piece(s)

    async def _final(self, data: Any = None) -> None:
        now = time.perf_counter()
        s, fut = self.current, self.done
        if s is None or fut is None or fut.done() or not isinstance(data, dict):
            return
        s.t_end = now
        s.finish_reason = str(data.get("finish_reason", ""))
        if s.finish_reason == "error" and not s.error:
            s.error = "the answer ended with finish_reason error"
        if data.get("data") != s.text:  # the deltas must add up to the final text
            s.finish_reason += " (deltas != final text)"
        self._resolve(s)

    async def _disconnect(self, *_args: Any) -> None:
        s = self.current
        if s is not None:
            s.t_end = time.perf_counter()
            s.error = s.error or "the Socket.IO connection closed during the answer"
            self._resolve(s)

    async def start(self, prompt: str) -> asyncio.Future[Stream]:
        """Send `generate_msg`; the future resolves with the answer at its `final`."""
        self.done = asyncio.get_running_loop().create_future()
        self.current = Stream(t_send=time.perf_counter())
        await self.sio.emit("generate_msg", {"prompt": prompt})
        return self.done

    async def generate(self, prompt: str, timeout: float = 300) -> Stream:
        return await asyncio.wait_for(await self.start(prompt), timeout)

    async def regenerate(self, message_id: int, timeout: float = 300) -> Stream:
        """`generate_msg_from` a user message: the same turn answered again."""
        self.done = asyncio.get_running_loop().create_future()
        self.current = Stream(t_send=time.perf_counter())
        await self.sio.emit("generate_msg_from", {"id": message_id})
        return await asyncio.wait_for(self.done, timeout)

    async def stop(self) -> None:
        await self.sio.emit("stop_gen")

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()
        await self.http.close()


# ------------------------------------------------------------------ OpenAI (SSE)


@dataclass(frozen=True)
class SSEEvent:
    event: str  # "message" unless the server named it (`event:`), "error" for `error:`
    data: str


class SSEParser:
    """Incremental server-sent-events parser: feed the bytes as they arrive, in chunks cut
    anywhere, and get the complete events. Lines end with LF, CRLF or CR; `:` starts a
    comment; an event's `data:` lines are joined with newlines and dispatched at the blank
    line. A non-standard `error: {...}` line (llama.cpp's server) becomes an "error" event."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            cr, lf = self._buf.find(b"\r"), self._buf.find(b"\n")
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr == len(self._buf) - 1:  # CR last: an LF may follow in the next chunk
                    break
                end, skip = cr, 2 if self._buf[cr + 1:cr + 2] == b"\n" else 1
            else:
                end, skip = lf, 1
            line = self._buf[:end].decode("utf-8", errors="replace")
            self._buf = self._buf[end + skip:]
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def close(self) -> list[SSEEvent]:
        """The end of the stream: a last line or event without its terminator counts."""
        out: list[SSEEvent] = []
        if self._buf:
            line = self._buf.rstrip(b"\r").decode("utf-8", errors="replace")
            self._buf = b""
            event = self._line(line)
            if event is not None:
                out.append(event)
        event = self._line("")
        if event is not None:
            out.append(event)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "error":
            self._data.append(value)
            self._event = "error"
        return None


def error_message(body: Any) -> str:
    """The message of an OpenAI-style error (`{"error": {"message"}}`, `{"error": text}`,
    or the error object itself)."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class StreamReader:
    """Turns the events of one OpenAI stream into a `Stream` (pieces, usage, errors)."""

    def __init__(self, s: Stream, on_piece: PieceHook | None = None) -> None:
        self.s = s
        self.on_piece = on_piece
        self.done = False  # `[DONE]` seen

    def event(self, ev: SSEEvent) -> None:
        s = self.s
        if self.done or s.error:
            return
        if ev.data.strip() == "[DONE]":
            self.done = True
            return
        try:
            body = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            s.error = f"not JSON in the event stream: {ev.data[:200]!r}"
            return
        if ev.event == "error" or (isinstance(body, dict) and "error" in body):
            s.error = error_message(body)
            return
        if not isinstance(body, dict):
            s.error = f"unexpected event data: {ev.data[:200]!r}"
            return
        usage = body.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            s.usage_tokens = usage["completion_tokens"]
        choices = body.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):  # chat: content, or a reasoning model's thinking
                text = delta.get("content") or delta.get("reasoning_content") or ""
            else:
                text = choice.get("text") or ""
            if text:
                s.add_piece(str(text), time.perf_counter())
                if self.on_piece is not None:
                    self.on_piece(s)
            if choice.get("finish_reason"):
                s.finish_reason = str(choice["finish_reason"])


def openai_body(endpoint: str, prompt: str, max_tokens: int, sampling: Mapping[str, Any],
                model: str | None, include_usage: bool = True) -> dict[str, Any]:
    """The request body: `sampling` holds only the parameters the user gave (the server's
    defaults apply to the others)."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "stream": True, **sampling}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


async def openai_stream(http: aiohttp.ClientSession, url: str, body: Mapping[str, Any], *,
                        endpoint: str = "completions", headers: Mapping[str, str] | None = None,
                        on_piece: PieceHook | None = None) -> Stream:
    """POST one streamed request and read it to its end; never raises for a failed answer
    (HTTP error, refused connection, `error` event, truncated stream): `Stream.error`."""
    s = Stream(t_send=time.perf_counter())
    reader = StreamReader(s, on_piece)
    parser = SSEParser()
    try:
        async with http.post(url.rstrip("/") + ENDPOINTS[endpoint], json=body,
                             headers=headers) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                try:
                    message = error_message(orjson.loads(raw))
                except orjson.JSONDecodeError:
                    message = raw[:300].decode("utf-8", errors="replace").strip()
                s.error = f"HTTP {resp.status}: {message or resp.reason}"
            else:
                async for chunk in resp.content.iter_any():
                    for ev in parser.feed(chunk):
                        reader.event(ev)
                    if reader.done or s.error:
                        break
                for ev in parser.close():
                    reader.event(ev)
    except (aiohttp.ClientError, OSError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.t_end = time.perf_counter()
    if not s.error and not reader.done and not s.finish_reason:
        s.error = "the event stream ended before [DONE]"
    return s


async def completion_stream(http: aiohttp.ClientSession, url: str, prompt: str,
                            n_predict: int, on_piece: PieceHook | None = None) -> Stream:
    """benchmarks/run.py's greedy fixed-length `/v1/completions` stream (no usage chunk
    asked); raises RuntimeError if the answer failed."""
    body = openai_body("completions", prompt, n_predict,
                       {"temperature": 0.0, "repeat_penalty": 1.0, "seed": 0}, None,
                       include_usage=False)
    s = await openai_stream(http, url, body, on_piece=on_piece)
    if s.error:
        raise RuntimeError(f"{url}: {s.error}")
    return s
