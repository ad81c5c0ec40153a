"""Discussion and message routes (SPEC section 2), acting on the client's own session."""

from __future__ import annotations

from contextlib import aclosing

from aiohttp import web

from .keys import DISCUSSIONS, SESSIONS, SETTINGS
from .requests import (
    parse_int,
    query_int,
    query_str,
    read_json_object,
    read_limited,
    require_field,
    require_id,
)
from .responses import JSON_CONTENT_TYPE, json_bytes_response, json_response
from .security import changes_state
from .session import client_session

routes = web.RouteTableDef()

OK = {"status": True}


@routes.get("/new_discussion", allow_head=False)  # HEAD must not change state
@changes_state
async def new_discussion(request: web.Request) -> web.Response:
    title = query_str(request, "title", required=False)
    session = await client_session(request)
    result = await request.app[DISCUSSIONS].new_discussion(session, title)
    return json_response(result)


@routes.post("/load_discussion")
async def load_discussion(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    discussion_id = require_id(data)
    session = await client_session(request)
    body = await request.app[DISCUSSIONS].load_json(session, discussion_id)
    return json_bytes_response(body)


@routes.post("/delete_discussion")
async def delete_discussion(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    discussion_id = require_id(data)
    await request.app[DISCUSSIONS].delete(discussion_id)
    return json_response(OK)


@routes.post("/rename")
async def rename(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    title = require_field(data, "title", str)
    session = await client_session(request)
    await request.app[DISCUSSIONS].rename_current(session, title)
    return json_response(OK)


@routes.post("/edit_title")
async def edit_title(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    discussion_id = require_id(data)
    title = require_field(data, "title", str)
    await request.app[DISCUSSIONS].edit_title(discussion_id, title)
    return json_response(OK)


@routes.get("/update_message", allow_head=False)  # HEAD must not change state
@changes_state
async def update_message(request: web.Request) -> web.Response:
    message_id = query_int(request, "id")
    content = query_str(request, "message")
    assert content is not None
    await request.app[DISCUSSIONS].update_message(message_id, content)
    return json_response(OK)


async def _rank(request: web.Request, delta: int) -> web.Response:
    new_rank = await request.app[DISCUSSIONS].change_rank(query_int(request, "id"), delta)
    return json_response({"status": True, "new_rank": new_rank})


@routes.get("/message_rank_up", allow_head=False)  # HEAD must not change state
@changes_state
async def message_rank_up(request: web.Request) -> web.Response:
    return await _rank(request, 1)


@routes.get("/message_rank_down", allow_head=False)  # HEAD must not change state
@changes_state
async def message_rank_down(request: web.Request) -> web.Response:
    return await _rank(request, -1)


@routes.get("/delete_message", allow_head=False)  # HEAD must not change state
@changes_state
async def delete_message(request: web.Request) -> web.Response:
    session = await client_session(request)
    await request.app[DISCUSSIONS].delete_message(session,
                                                  query_int(request, "id"))
    return json_response(OK)


async def _stream_export(request: web.Request, ids: list[int] | None) -> web.StreamResponse:
    service = request.app[DISCUSSIONS]
    chunks = service.export(ids)
    # read the first piece before answering, so a database error is still a clean 5xx JSON
    async with aclosing(chunks):
        first = await anext(chunks)
        response = web.StreamResponse(headers={"Cache-Control": "no-store"})
        response.content_type = JSON_CONTENT_TYPE
        response.charset = "utf-8"
        await response.prepare(request)
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


@routes.get("/export")
async def export(request: web.Request) -> web.StreamResponse:
    return await _stream_export(request, None)


@routes.post("/export_multiple_discussions")
async def export_multiple_discussions(request: web.Request) -> web.StreamResponse:
    data = await read_json_object(request)
    raw_ids = require_field(data, "discussion_ids", list)
    ids = [parse_int("discussion_ids[]", v) for v in raw_ids]
    await request.app[DISCUSSIONS].check_exist(ids)
    return await _stream_export(request, ids)


@routes.get("/export_discussion")
async def export_discussion(request: web.Request) -> web.Response:
    raw = query_str(request, "id", required=False)
    discussion_id = None if raw in (None, "") else parse_int("id", raw)
    session = await client_session(request)
    text = await request.app[DISCUSSIONS].export_text(session, discussion_id)
    return json_response({"discussion_text": text})


@routes.post("/import_multiple_discussions")
async def import_multiple_discussions(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].config
    body = await read_limited(request, config.max_import_size)
    ids = await request.app[DISCUSSIONS].import_json(body, config.max_import_messages)
    return json_response({"status": True, "ids": ids})


@routes.get("/stop_gen", allow_head=False)  # HEAD must not change state
@changes_state
async def stop_gen(request: web.Request) -> web.Response:
    session = await client_session(request)
    await request.app[SESSIONS].stop(session)
    return json_response(OK)
