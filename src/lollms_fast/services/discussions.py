"""Discussions and messages for one client: creating, selecting, editing, exporting, importing.

The client's current discussion and last message live in its `ClientSession`, never in a
global; the rows live in the store.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from ..errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from ..parsing import check_text, parse_int, parse_json_object
from ..storage.base import (
    MSG_CONDITIONING,
    MSG_NORMAL,
    ImportedDiscussion,
    ImportedMessage,
    NewMessage,
    Store,
)
from .history import branch, default_leaf, render_transcript
from .personalities import PersonalityService
from .sessions import ClientSession, SessionStore
from .settings import SettingsService

CONDITIONING_SENDER = "conditionner"  # the 2023 spelling, kept for compatibility


class DiscussionService:
    def __init__(self, store: Store, sessions: SessionStore,
                 personalities: PersonalityService, settings: SettingsService) -> None:
        self.store = store
        self.sessions = sessions
        self.personalities = personalities
        self.settings = settings

    async def list_json(self) -> bytes:
        return await self.store.list_json()

    async def new_discussion(self, session: ClientSession, title: str | None
                             ) -> dict[str, Any]:
        if title is not None:
            check_text("title", title)
        personality = await self.personalities.current()
        now = _dt.datetime.now()
        welcome = personality.welcome_message(now)
        first = [NewMessage(CONDITIONING_SENDER, personality.conditioning(now),
                            MSG_CONDITIONING, parent=0)]
        if welcome:
            first.append(NewMessage(personality.name, welcome, MSG_NORMAL))
        discussion_id, ids = await self.store.create(title, first)
        session.select(discussion_id, ids[-1])
        return {"id": discussion_id, "time": now.strftime("%Y-%m-%d %H:%M:%S"),
                "welcome_message": welcome, "sender": personality.name}

    async def load_json(self, session: ClientSession, discussion_id: int) -> bytes:
        """Select the discussion for this client (its pointer on the newest message) and
        return its messages as a JSON array."""
        found = await self.store.messages_json(discussion_id)
        if found is None:
            raise NotFound(f"discussion {discussion_id} not found")
        body, newest = found
        session.select(discussion_id, newest)
        return body

    async def delete(self, discussion_id: int) -> None:
        if not await self.store.delete(discussion_id):
            raise NotFound(f"discussion {discussion_id} not found")
        await self.sessions.discussion_deleted(discussion_id)

    async def rename_current(self, session: ClientSession, title: str) -> int:
        check_text("title", title)
        if session.discussion_id is None:
            raise Conflict("no discussion is selected: create or load one first")
        discussion_id = session.discussion_id
        if not await self.store.rename(discussion_id, title):
            session.select(None, None)
            raise NotFound(f"discussion {discussion_id} no longer exists")
        return discussion_id

    async def edit_title(self, discussion_id: int, title: str) -> None:
        check_text("title", title)
        if not await self.store.rename(discussion_id, title):
            raise NotFound(f"discussion {discussion_id} not found")

    async def update_message(self, message_id: int, content: str) -> None:
        check_text("message", content)
        if not await self.store.update_content(message_id, content):
            raise NotFound(f"message {message_id} not found")

    async def change_rank(self, message_id: int, delta: int) -> int:
        rank = await self.store.change_rank(message_id, delta)
        if rank is None:
            raise NotFound(f"message {message_id} not found")
        return rank

    async def delete_message(self, session: ClientSession, message_id: int) -> None:
        discussion_id = await self.store.message_discussion(message_id)
        if discussion_id is None or not await self.store.delete_message(message_id):
            raise NotFound(f"message {message_id} not found")
        if session.last_message_id == message_id:
            session.select(session.discussion_id,
                           await self.store.last_message_id(discussion_id))

    async def check_exist(self, ids: Sequence[int]) -> None:
        missing = await self.store.missing(ids)
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            raise NotFound(f"discussion(s) not found: {shown}")

    def export(self, ids: Sequence[int] | None = None) -> AsyncGenerator[bytes, None]:
        return self.store.export(ids)

    async def export_text(self, session: ClientSession, discussion_id: int | None) -> str:
        if discussion_id is None:
            if session.discussion_id is None:
                raise Conflict("no discussion is selected: pass an id or load one first")
            discussion_id = session.discussion_id
        messages = await self.store.messages(discussion_id)
        if messages is None:
            raise NotFound(f"discussion {discussion_id} not found")
        ids = {m["id"] for m in messages}
        leaf = (session.last_message_id
                if session.discussion_id == discussion_id and session.last_message_id in ids
                else default_leaf(messages))
        personality = await self.personalities.current()
        return render_transcript(personality, branch(messages, leaf),
                                 self.settings.config.nb_messages_to_remember)

    async def import_json(self, body: bytes, max_items: int) -> list[int]:
        """An import request's body: parsed and checked whole in a thread (a large import
        must not stall the event loop), then written in one transaction."""
        discussions = await asyncio.to_thread(parse_import_body, body, max_items)
        return await self.store.import_many(discussions)


# ------------------------------------------------------------------ import payload


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else parse_int(what, value, text=False)


# what openapi.json's ImportedMessage.created_at pattern says, exactly
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[ T][0-9:.Z+-]{0,40})?\Z")


def _message(raw: Any, where: str) -> ImportedMessage:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object")
    sender, content = raw.get("sender"), raw.get("content")
    if not isinstance(sender, str) or not isinstance(content, str):
        raise BadRequest(f"{where} needs text fields 'sender' and 'content'")
    check_text(f"{where}.sender", sender)
    check_text(f"{where}.content", content)
    created = raw.get("created_at")
    if created is not None and not (isinstance(created, str) and _DATE.match(created)):
        # the column has SQLite's NUMERIC affinity: text that looks like a number would be
        # stored as one and exported as one ("1e100" -> 1e+100)
        raise BadRequest(f"{where}.created_at must be a date and time as text "
                         f"(YYYY-MM-DD HH:MM:SS, as the 2023 export writes it)")
    msg_type = _opt_int(raw.get("type"), f"{where}.type")
    rank = _opt_int(raw.get("rank"), f"{where}.rank")
    return ImportedMessage(
        old_id=_opt_int(raw.get("id"), f"{where}.id"),
        message=NewMessage(sender, content, MSG_NORMAL if msg_type is None else msg_type,
                           rank or 0, _opt_int(raw.get("parent"), f"{where}.parent"),
                           created))


def parse_import_body(body: bytes, max_items: int) -> list[ImportedDiscussion]:
    """`{"jArray": [...]}`: at most `max_items` discussions and `max_items` messages."""
    data = parse_json_object(body)
    if "jArray" not in data:
        raise BadRequest("field 'jArray' is required")
    return parse_import(data["jArray"], max_items)


def parse_import(raw: Any, max_items: int) -> list[ImportedDiscussion]:
    """The export format, checked whole before anything is written (BadRequest otherwise)."""
    if not isinstance(raw, list):
        raise BadRequest("jArray must be a list of discussions")
    if len(raw) > max_items:
        raise PayloadTooLarge(f"an import holds at most {max_items} discussions")
    n_messages = sum(len(d["messages"]) for d in raw
                     if isinstance(d, dict) and isinstance(d.get("messages"), list))
    if n_messages > max_items:
        raise PayloadTooLarge(f"an import holds at most {max_items} messages")
    out: list[ImportedDiscussion] = []
    for i, d in enumerate(raw):
        where = f"jArray[{i}]"
        if not isinstance(d, dict):
            raise BadRequest(f"{where} must be an object")
        title = d.get("title")
        if title is not None and not isinstance(title, str):
            raise BadRequest(f"{where}.title must be text or null")
        if title is not None:
            check_text(f"{where}.title", title)
        messages = d.get("messages", [])
        if not isinstance(messages, list):
            raise BadRequest(f"{where}.messages must be a list")
        out.append(ImportedDiscussion(
            title, [_message(m, f"{where}.messages[{j}]") for j, m in enumerate(messages)]))
    return out
