"""Prompt building: personality conditioning + the branch's recent messages + the new prompt.

The text is the 2023 format: conditioning, then each turn as `prefix + content`, turns joined
by the link text, and after the new prompt `link + ai_prefix`. It is tokenized as segments,
each on its own, and concatenated:

    [BOS conditioning] [user_prefix] [m1] [link] [ai_prefix] [m2] [link] ...
    [user_prefix] [prompt] [link] [ai_prefix]

The personality's own text (conditioning, prefixes, link) may spell control tokens such as
`<start_of_turn>`; message contents are what users typed (or edited), so they are tokenized
with special-token parsing off: a typed `<end_of_turn>` stays text and can never forge a
turn boundary.

Segment boundaries do not move between turns, so turn N's prompt tokens (followed by the
answer) are a prefix of turn N+1's and the engine's prefix cache skips them. The history is
trimmed by tokens to its budget, oldest messages first; the conditioning and the new prompt
are never dropped, and are refused only past the prompt limit (see chat.prompt_budgets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BadRequest
from ..personalities.model import Personality

# (text, add_bos, parse_special) -> tokens
Tokenize = Callable[[str, bool, bool], list[int]]


@dataclass(frozen=True)
class PromptStyle:
    conditioning: str  # with {{date}} etc. already expanded
    user_prefix: str
    ai_prefix: str
    link: str
    ai_name: str  # messages from this sender use ai_prefix; anything else is the user

    @classmethod
    def of(cls, personality: Personality, conditioning: str | None = None) -> PromptStyle:
        """The personality's layout; `conditioning` (a discussion's stored, already expanded
        text) replaces the personality's own when given."""
        return cls(
            conditioning=personality.conditioning() if conditioning is None else conditioning,
            user_prefix=personality.user_message_prefix,
            ai_prefix=personality.ai_message_prefix,
            link=personality.link_text,
            ai_name=personality.name,
        )

    def is_ai(self, sender: str) -> bool:
        return sender == self.ai_name

    def turn_text(self, turn: Turn) -> str:
        """One past turn as it appears in a prompt or a transcript."""
        return "".join(text for text, _ in self.turn_segments(turn.content,
                                                              self.is_ai(turn.sender)))

    def turn_segments(self, content: str, ai: bool) -> list[tuple[str, bool]]:
        """(text, is the personality's own text) segments of one turn: the one place that
        chooses a prefix."""
        return [(self.ai_prefix if ai else self.user_prefix, True), (content, False),
                (self.link, True)]


@dataclass(frozen=True)
class Turn:
    sender: str
    content: str


@dataclass(frozen=True)
class BuiltPrompt:
    tokens: list[int]
    text: str
    n_history_used: int
    n_history_dropped: int


class ContextOverflow(BadRequest):
    """Even the conditioning and the new prompt alone do not fit the context budget."""


def build_prompt(
    style: PromptStyle,
    history: Sequence[Turn],
    prompt: str,
    tokenize: Tokenize,
    budget: int,
    max_history: int,
    limit: int | None = None,
    max_turn_chars: int | None = None,
) -> BuiltPrompt:
    """Tokens for the model. `history` is the branch, oldest first, without the new prompt.
    Past turns are kept, newest first, while the whole stays within `budget` tokens; the
    conditioning and the new turn alone may take up to `limit` (default: `budget`). A past
    turn longer than `max_turn_chars` ends the history there (it is never tokenized)."""
    limit = budget if limit is None else limit
    recent = list(history[-max_history:]) if max_history > 0 else []
    own: dict[str, list[int]] = {}  # the personality's segments recur: tokenize them once

    def segment_tokens(segments: list[tuple[str, bool]]) -> list[int]:
        out: list[int] = []
        for text, trusted in segments:
            if not trusted:
                out += tokenize(text, False, False)
            else:
                if text not in own:
                    own[text] = tokenize(text, False, True)
                out += own[text]
        return out

    cond = tokenize(style.conditioning, True, True)
    ai_prefix = segment_tokens([(style.ai_prefix, True)])
    new_turn = segment_tokens(style.turn_segments(prompt, ai=False))
    fixed = len(cond) + len(new_turn) + len(ai_prefix)
    if fixed > limit:
        raise ContextOverflow(
            f"the message needs {fixed} tokens with the conditioning, but the context takes "
            f"at most {limit} and keeps the rest for the answer; shorten the message or raise "
            f"ctx_size")

    # keep the newest turns that fit
    kept: list[list[int]] = []
    used = fixed
    for turn in reversed(recent):
        if max_turn_chars is not None and len(turn.content) > max_turn_chars:
            break
        tokens = segment_tokens(style.turn_segments(turn.content, style.is_ai(turn.sender)))
        if used + len(tokens) > budget:
            break
        kept.append(tokens)
        used += len(tokens)
    kept.reverse()
    kept_turns = recent[len(recent) - len(kept):]

    tokens = cond + [t for seg in kept for t in seg] + new_turn + ai_prefix
    text = style.conditioning + "".join(style.turn_text(turn) for turn in kept_turns)
    text += style.user_prefix + prompt + style.link + style.ai_prefix
    return BuiltPrompt(tokens=tokens, text=text, n_history_used=len(kept_turns),
                       n_history_dropped=len(history) - len(kept_turns))
