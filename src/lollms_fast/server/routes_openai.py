"""The OpenAI-compatible HTTP API (SPEC section 9): `/v1/models`, `/v1/chat/completions`,
`/v1/completions`, streamed as server-sent events or answered whole.

Framing. Every stream has one `id`; a chat stream's first chunk carries
`delta.role = "assistant"`; each choice's last chunk carries its `finish_reason`; with
`stream_options.include_usage` a last chunk has `choices: []` and the `usage`; then
`data: [DONE]`. A text chunk costs one orjson call for its text: the rest of the frame is
built once per choice.

A client that goes away cancels its generations: a write to a closed connection fails, and
between writes a timer looks at the connection every DISCONNECT_POLL_S, so a client that
leaves while nothing is written (a long prompt, text held back by a stop sequence, a
non-streamed answer) frees its slots within about one engine step.

Errors use OpenAI's shape (server/responses.py); CORS answers only origins listed in
`allowed_origins` (same-origin pages need none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ..engine.scheduler import Generation
from ..engine.types import FinishReason
from ..errors import LollmsError, ModelNotReady, NotFound
from ..services.completions import (
    CHAT,
    TEXT,
    Completion,
    chat_logprobs,
    finish_reason,
    text_logprobs,
)
from .keys import COMPLETIONS, SETTINGS
from .middlewares import public
from .requests import read_json_object
from .responses import OPENAI_PREFIX, json_response, openai_error
from .security import OriginPolicy

log = logging.getLogger("lollms_fast.openai")

routes = web.RouteTableDef()

DISCONNECT_POLL_S = 0.01
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    service = request.app[COMPLETIONS]
    engine = service.engines.current
    data = []
    if engine is not None:
        data.append({"id": service.model_id(), "object": "model",
                     "created": service.started, "owned_by": "lollms_fast"})
    return json_response({"object": "list", "data": data})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CHAT)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, TEXT)


@routes.options("/v1/{tail:.*}")
@public
async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: allowed origins get the methods and headers they ask for."""
    response = web.Response(status=204)
    if _cors_origin(request) is not None:
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type")
        response.headers["Access-Control-Max-Age"] = "600"
    return response


@routes.get("/v1/{tail:.*}")
@public
async def no_get_route(request: web.Request) -> web.Response:
    """GET on a /v1/ path no GET route serves: 405 with `Allow` when a route takes the path
    with other methods (GET /v1/chat/completions), else 404; the static files' catch-all
    would call either a missing file."""
    allowed = {r.method for r in request.app.router.routes()
               if r.resource is not None and r.resource.canonical == request.path}
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed | {"OPTIONS"})
    raise NotFound("no such route")


def _cors_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    policy = OriginPolicy(request.app[SETTINGS].config)
    if policy.any or policy.lists(origin):
        return origin
    return None


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: `Access-Control-Allow-Origin` for listed origins on /v1/."""
    if request.path.startswith(OPENAI_PREFIX):
        origin = _cors_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    service = request.app[COMPLETIONS]
    body = await read_json_object(request)
    job = service.parse(kind, body)
    completion = await service.start(job)
    watch = _DisconnectWatch(request, completion.cancel)
    try:
        if job.stream:
            return await _stream(request, completion)
        return await _whole(completion)
    finally:
        watch.stop()
        service.release(completion)


# ---------------------------------------------------------------------- whole answers

async def _whole(completion: Completion) -> web.Response:
    for choice in completion.choices:
        await choice.generation.wait()
    _raise_failure(completion)
    choices = []
    for choice in completion.choices:
        gen = choice.generation
        assert gen.finish is not None
        n_probs = gen.request.params.n_probs
        entries = gen.take_logprobs() if n_probs >= 0 else None
        item: dict[str, Any] = {"index": choice.index}
        if completion.kind == CHAT:
            item["message"] = {"role": "assistant", "content": gen.finish.text}
            item["logprobs"] = chat_logprobs(entries) if entries is not None else None
        else:
            item["text"] = gen.finish.text
            item["logprobs"] = text_logprobs(entries, 0) if entries is not None else None
        item["finish_reason"] = finish_reason(gen)
        choices.append(item)
    return json_response({"id": completion.id, "object": completion.kind,
                          "created": completion.created, "model": completion.model,
                          "choices": choices, "usage": completion.usage()})


def _raise_failure(completion: Completion) -> None:
    for choice in completion.choices:
        finish = choice.generation.finish
        if finish is None:
            continue
        if finish.reason is FinishReason.ERROR:
            raise LollmsError(finish.error or "the generation failed")
        if finish.reason is FinishReason.CANCELLED:
            raise ModelNotReady("the generation was cancelled (the server is stopping or "
                                "reloading its model)")


# ---------------------------------------------------------------------- streams

class _Frames:
    """Pre-built SSE frames of one stream: a text chunk is prefix + JSON string + suffix."""

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self.chat = completion.kind == CHAT
        self.usage_null = completion.request.include_usage
        head = {"id": completion.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": completion.created, "model": completion.model}
        self._head = orjson.dumps(head)[:-1]  # without its closing brace
        self._text_parts: dict[int, tuple[bytes, bytes]] = {}

    def chunk(self, choices: list[dict[str, Any]], usage: Any = None,
              with_usage: bool = False) -> bytes:
        body = {"choices": choices}
        if with_usage or self.usage_null:
            body["usage"] = usage
        return b"data: " + self._head + b"," + orjson.dumps(body)[1:] + b"\n\n"

    def text(self, index: int, text: str) -> bytes:
        parts = self._text_parts.get(index)
        if parts is None:
            key = b'"delta":{"content":' if self.chat else b'"text":'
            close = b"}" if self.chat else b""
            usage = b',"usage":null' if self.usage_null else b""
            parts = (b"data: " + self._head + b',"choices":[{"index":' + str(index).encode()
                     + b"," + key,
                     close + b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n")
            self._text_parts[index] = parts
        return parts[0] + orjson.dumps(text) + parts[1]

    def piece(self, index: int, text: str, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": {"content": text}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def first(self, index: int) -> bytes:
        return self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])

    def end(self, index: int, reason: str) -> bytes:
        empty: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
        return self.chunk([{"index": index, **empty, "logprobs": None,
                            "finish_reason": reason}])


class _ChoiceStream:
    """What one choice has streamed so far (for text offsets of legacy logprobs)."""

    def __init__(self, index: int, generation: Generation) -> None:
        self.index = index
        self.generation = generation
        self.sent = 0  # characters


async def _stream(request: web.Request, completion: Completion) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    frames = _Frames(completion)
    try:
        if frames.chat:
            await response.write(b"".join(frames.first(c.index) for c in completion.choices))
        if len(completion.choices) == 1:
            choice = completion.choices[0]
            await _pump(response, frames, _ChoiceStream(choice.index, choice.generation))
        else:
            # several choices: each is read by its own task, frames are written in the
            # order their text arrives
            await asyncio.gather(*(
                _pump(response, frames, _ChoiceStream(c.index, c.generation))
                for c in completion.choices))
        failed = _failure(completion)
        if failed is not None:
            await response.write(b"data: " + orjson.dumps(failed) + b"\n\n")
        elif completion.request.include_usage:
            await response.write(frames.chunk([], completion.usage(), with_usage=True))
        await response.write(DONE)
        await response.write_eof()
    except ConnectionError:  # the client went away: nobody is left to answer
        completion.cancel()
    except asyncio.CancelledError:
        completion.cancel()
        raise
    return response


async def _pump(response: web.StreamResponse, frames: _Frames, choice: _ChoiceStream
                ) -> None:
    gen = choice.generation
    with_logprobs = gen.request.params.n_probs >= 0
    write: Callable[[bytes], Any] = response.write
    async for text in gen:
        if with_logprobs:
            entries = gen.take_logprobs()
            logprobs = (chat_logprobs(entries) if frames.chat
                        else text_logprobs(entries, choice.sent))
            await write(frames.chunk([frames.piece(choice.index, text, logprobs)]))
        else:
            await write(frames.text(choice.index, text))
        choice.sent += len(text)
    finish = await gen.wait()
    if finish.reason in (FinishReason.STOP, FinishReason.LENGTH):
        if with_logprobs:  # tokens that brought no text (a stop sequence's, end of text)
            entries = gen.take_logprobs()
            if entries:
                logprobs = (chat_logprobs(entries) if frames.chat
                            else text_logprobs(entries, choice.sent))
                await write(frames.chunk([frames.piece(choice.index, "", logprobs)]))
        await write(frames.end(choice.index, finish_reason(gen)))


def _failure(completion: Completion) -> dict[str, Any] | None:
    """The OpenAI error object of a stream whose generation failed (sent as an event)."""
    for choice in completion.choices:
        finish = choice.generation.finish
        if finish is None or finish.reason in (FinishReason.STOP, FinishReason.LENGTH):
            continue
        if finish.reason is FinishReason.ERROR:
            message = finish.error or "the generation failed"
        else:
            message = "the generation was cancelled (the server is stopping or reloading)"
        return openai_error(message, 500)
    return None


class _DisconnectWatch:
    """Calls `on_gone` once the client's connection is closed (checked on a timer)."""

    def __init__(self, request: web.Request, on_gone: Callable[[], None]) -> None:
        self._request = request
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(
            DISCONNECT_POLL_S, self._check)

    def _check(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._handle = None
            self._on_gone()
            return
        self._handle = self._loop.call_later(DISCONNECT_POLL_S, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
