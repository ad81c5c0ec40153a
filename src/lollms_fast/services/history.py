"""Discussion history as a tree: the branch that leads to a message, and its text rendering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..personalities.model import Personality
from ..storage.discussions import MSG_NORMAL


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


def render_transcript(personality: Personality, turns: Sequence[Mapping[str, Any]],
                      max_turns: int) -> str:
    """Conditioning + the last `max_turns` normal messages, each `prefix + content + link`
    (the prompt layout of SPEC section 5, without the trailing AI prefix)."""
    normal = [m for m in turns if m["type"] == MSG_NORMAL]
    recent = normal[-max_turns:] if max_turns > 0 else []
    link = personality.link_text
    parts = [personality.conditioning()]
    for m in recent:
        prefix = (personality.ai_message_prefix if m["sender"] == personality.name
                  else personality.user_message_prefix)
        parts.append(prefix + str(m["content"]) + link)
    return "".join(parts)
