"""The two streaming clients of the benchmark, both timing every piece on arrival.

- `LollmsClient`: what a browser does, through lollms_fast's real interfaces: an HTTP session
  (its cookie) shared with a Socket.IO connection in delta mode (`?stream=delta`, so each
  `message` carries only the new text), `generate_msg {"prompt"}`, then `message`* and `final`.
- `completion_stream`: llama-cpp-python's OpenAI API, `POST /v1/completions` with
  `stream: true`, read as server-sent events.

Both run in the benchmark process's event loop, outside the servers' processes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import socketio


@dataclass
class Stream:
    """One answer as a client saw it (perf_counter seconds)."""

    t_send: float
    t_first: float = 0.0  # first non-empty piece
    t_end: float = 0.0  # `final` / the last SSE event
    piece_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    late_pieces: int = 0  # pieces of this answer received after its `final` (must be 0)
    n_tokens: int = 0  # filled by the caller (see run.py: how tokens are counted)
    ai_message_id: int | None = None
    user_message_id: int | None = None

    @property
    def ttft(self) -> float:
        """Send -> first piece; an answer with no text at all counts its `final`."""
        return (self.t_first or self.t_end) - self.t_send

    def gaps(self) -> list[float]:
        t = self.piece_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


class LollmsClient:
    """One browser-like client of lollms_fast (cookie session + Socket.IO, delta mode)."""

    def __init__(self, base: str) -> None:
        self.base = base
        # unsafe=True: keep cookies from an IP host (the server is on 127.0.0.1)
        self.http = aiohttp.ClientSession(base_url=base,
                                          cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sio = socketio.AsyncClient(reconnection=False)
        self.current: Stream | None = None
        self.done: asyncio.Future[Stream] | None = None
        self.finished: list[Stream] = []  # ended answers, to catch pieces arriving late
        self.on_piece: Any = None  # optional callback(stream) after every piece
        self.sio.on("message", self._message)
        self.sio.on("final", self._final)
        self.sio.on("infos", self._infos)

    async def open(self) -> LollmsClient:
        async with self.http.get("/get_generation_status") as resp:  # sets the cookie
            resp.raise_for_status()
        cookie = "; ".join(f"{c.key}={c.value}" for c in self.http.cookie_jar)
        await self.sio.connect(self.base + "?stream=delta", headers={"Cookie": cookie},
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

    async def _infos(self, data: Any = None) -> None:
        if self.current is not None and isinstance(data, dict):
            self.current.ai_message_id = data.get("ai_message_id")
            self.current.user_message_id = data.get("user_message_id")

    async def _message(self, data: Any = None) -> None:
        now = time.perf_counter()
        s = self.current
        if s is None or (isinstance(data, dict)
                         and data.get("ai_message_id") != s.ai_message_id):
            for old in self.finished:  # a piece of an answer that already ended
                if isinstance(data, dict) and data.get("ai_message_id") == old.ai_message_id:
                    old.late_pieces += 1
            return
        piece = str(data.get("data", ""))
        if not piece:
            return
        if not s.piece_times:
            s.t_first = now
        s.piece_times.append(now)
        s.text += piece
        if self.on_piece is not None:
            self.on_piece(s)

    async def _final(self, data: Any = None) -> None:
        now = time.perf_counter()
        s, fut = self.current, self.done
        if s is None or fut is None or fut.done():
            return
        s.t_end = now
        s.finish_reason = str(data.get("finish_reason", ""))
        if data.get("data") != s.text:  # the deltas must add up to the final text
            s.finish_reason += " (deltas != final text)"
        self.current = None
        self.finished.append(s)
        fut.set_result(s)

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


async def completion_stream(http: aiohttp.ClientSession, url: str, prompt: str,
                            n_predict: int, on_piece: Any = None) -> Stream:
    """One streamed OpenAI completion from llama-cpp-python's server, greedy, fixed length."""
    body = {"prompt": prompt, "max_tokens": n_predict, "temperature": 0.0,
            "repeat_penalty": 1.0, "seed": 0, "stream": True}
    s = Stream(t_send=time.perf_counter())
    async with http.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            now = time.perf_counter()
            choice = orjson.loads(payload)["choices"][0]
            if choice.get("text"):
                if not s.piece_times:
                    s.t_first = now
                s.piece_times.append(now)
                s.text += choice["text"]
                if on_piece is not None:
                    on_piece(s)
            if choice.get("finish_reason"):
                s.finish_reason = choice["finish_reason"]
    s.t_end = time.perf_counter()
    return s
