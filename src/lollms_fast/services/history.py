"""Discussion history as a tree: the branch that leads to a message, and its text rendering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..personalities.model import Personality
from ..storage.base import MSG_NORMAL
from .prompt import PromptStyle, Turn


def branch(messages: Sequence[Mapping[str, Any]], leaf_id: int | None
           ) -> list[Mapping[str, Any]]:
    """The messages from the root to `leaf_id` (oldest first), following `parent`. The walk
    stops at a parent that is not in `messages` (0 and -1 mean "no parent" in 2023 rows)."""
    by_id = {m["id"]: m for m in messages}
    path: list[Mapping[str, Any]] = []
    seen: set[int] = set()
    current = by_id.get(leaf_id) if leaf_id is not None else None
    while current is not None and current["id"] not in seen:
        seen.add(current["id"])
        path.append(current)
        current = by_id.get(current["parent"])
    path.reverse()
    return path


def default_leaf(messages: Sequence[Mapping[str, Any]]) -> int | None:
    """The newest normal message (what the discussion's last answer replied from)."""
    for m in reversed(messages):
        if m["type"] == MSG_NORMAL:
            return int(m["id"])
    return None


def history_turns(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """The normal (type 0) messages as prompt turns; conditioning rows are not turns."""
    return [Turn(str(m["sender"]), str(m["content"])) for m in messages
            if m["type"] == MSG_NORMAL]


def render_transcript(personality: Personality, messages: Sequence[Mapping[str, Any]],
                      max_turns: int) -> str:
    """Conditioning + the last `max_turns` normal messages, laid out as in a prompt
    (SPEC section 5), without the trailing AI prefix."""
    style = PromptStyle.of(personality)
    turns = history_turns(messages)
    recent = turns[-max_turns:] if max_turns > 0 else []
    return style.conditioning + "".join(style.turn_text(t) for t in recent)
