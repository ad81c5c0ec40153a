"""Prompt building and token trimming.

These tests use a deterministic character tokenizer (one token per character, BOS = -1) so
the budgets are easy to reason about; real-model prompts are covered by the chat tests."""

from __future__ import annotations

import pytest

from lollms_fast.services.chat import prompt_budgets
from lollms_fast.services.prompt import ContextOverflow, PromptStyle, Turn, build_prompt

STYLE = PromptStyle(conditioning="COND\n", user_prefix="### user:\n",
                    ai_prefix="### lollms:\n", link="\n", ai_name="lollms")


def char_tokenize(text: str, add_bos: bool, special: bool = True) -> list[int]:
    """One token per character; with `special`, the spelled control token `<eot>` is one
    token (-2)."""
    out = [-1] if add_bos else []
    parts = text.split("<eot>") if special else [text]
    for i, part in enumerate(parts):
        if i:
            out.append(-2)
        out += [ord(c) for c in part]
    return out


HISTORY = [Turn("lollms", "Welcome!"), Turn("user", "hi"), Turn("lollms", "hello there")]


def test_text_matches_the_2023_layout() -> None:
    built = build_prompt(STYLE, HISTORY, "how are you?", char_tokenize, budget=10_000,
                         max_history=5)
    assert built.text == ("COND\n### lollms:\nWelcome!\n### user:\nhi\n### lollms:\nhello there"
                          "\n### user:\nhow are you?\n### lollms:\n")
    assert built.tokens == char_tokenize(built.text, True, False)
    assert built.n_history_used == 3 and built.n_history_dropped == 0


def test_next_turn_extends_the_previous_prompt() -> None:
    first = build_prompt(STYLE, HISTORY, "q1", char_tokenize, 10_000, 10)
    answer = "a1"
    second = build_prompt(STYLE, [*HISTORY, Turn("user", "q1"), Turn("lollms", answer)], "q2",
                          char_tokenize, 10_000, 10)
    assert second.tokens[:len(first.tokens)] == first.tokens


def test_max_history_keeps_the_newest() -> None:
    built = build_prompt(STYLE, HISTORY, "x", char_tokenize, 10_000, max_history=1)
    assert built.n_history_used == 1 and built.n_history_dropped == 2
    assert "hello there" in built.text and "Welcome" not in built.text
    none = build_prompt(STYLE, HISTORY, "x", char_tokenize, 10_000, max_history=0)
    assert none.text == "COND\n### user:\nx\n### lollms:\n"


def test_budget_drops_oldest_first_never_the_conditioning() -> None:
    full = build_prompt(STYLE, HISTORY, "x", char_tokenize, 10_000, 10)
    budget = len(full.tokens) - 1  # one token short: the oldest turn must go
    built = build_prompt(STYLE, HISTORY, "x", char_tokenize, budget, 10)
    assert len(built.tokens) <= budget
    assert built.text.startswith("COND\n") and "Welcome" not in built.text
    assert "hello there" in built.text and built.n_history_used == 2
    assert built.text.endswith("### user:\nx\n### lollms:\n")


def test_overflow_when_the_prompt_alone_does_not_fit() -> None:
    with pytest.raises(ContextOverflow, match="tokens"):
        build_prompt(STYLE, HISTORY, "y" * 100, char_tokenize, budget=50, max_history=10)


def test_a_long_message_may_pass_the_history_budget_up_to_the_limit() -> None:
    """n_predict is a maximum, not a reservation: the history stays within `budget`, the new
    message alone may take up to `limit`."""
    built = build_prompt(STYLE, HISTORY, "y" * 100, char_tokenize, budget=50, max_history=10,
                         limit=200)
    assert built.n_history_used == 0 and built.n_history_dropped == 3
    assert built.text == "COND\n### user:\n" + "y" * 100 + "\n### lollms:\n"
    with pytest.raises(ContextOverflow):
        build_prompt(STYLE, HISTORY, "y" * 200, char_tokenize, budget=50, max_history=10,
                     limit=200)


@pytest.mark.parametrize("n_ctx,n_predict,history,limit", [
    (2048, 1024, 1024, 1792),  # the default: the answer keeps an eighth at least
    (2048, 100, 1948, 1948),  # a short n_predict is reserved whole
    (2048, 4096, 512, 1792),  # huge n_predict: history keeps a quarter, answers an eighth
    (1024, 1024, 256, 896),
])
def test_prompt_budgets(n_ctx: int, n_predict: int, history: int, limit: int) -> None:
    assert prompt_budgets(n_ctx, n_predict) == (history, limit)


def test_the_reported_long_paste_now_fits() -> None:
    """Issue 11: a pasted text of 1,431 tokens with n_predict 1024 and ctx_size 2048 was
    refused ("only 1024 fit") though it leaves room for an answer."""
    history_budget, limit = prompt_budgets(2048, 1024)
    built = build_prompt(STYLE, HISTORY, "p" * 1410, char_tokenize, history_budget,
                         max_history=5, limit=limit)
    assert 1431 <= len(built.tokens) <= limit


def test_typed_control_tokens_stay_text_but_the_personality_may_use_them() -> None:
    """User and history text is tokenized with special-token parsing off (SPEC 7): a typed
    control token stays characters; the personality's own prefixes may spell one."""
    style = PromptStyle(conditioning="C<eot>", user_prefix="U<eot>", ai_prefix="A<eot>",
                        link="\n", ai_name="lollms")
    history = [Turn("user", "old <eot> question"), Turn("lollms", "old <eot> answer")]
    built = build_prompt(style, history, "new <eot> message", char_tokenize, 10_000, 10)
    assert built.tokens.count(-2) == 1 + 2 + 2  # conditioning, 2 user + 2 AI prefixes
    for text in ("old <eot> question", "old <eot> answer", "new <eot> message"):
        chars = [ord(c) for c in text]
        assert any(built.tokens[i:i + len(chars)] == chars for i in range(len(built.tokens)))


def test_a_past_turn_longer_than_the_limit_ends_the_history() -> None:
    """A huge stored message (an import, an edit) is never tokenized: the history stops
    there, newer turns are kept."""
    history = [Turn("user", "old"), Turn("lollms", "z" * 1000), Turn("user", "recent")]
    calls: list[str] = []

    def counting(text: str, add_bos: bool, special: bool) -> list[int]:
        calls.append(text)
        return char_tokenize(text, add_bos, special)

    built = build_prompt(STYLE, history, "q", counting, 10_000, 10, max_turn_chars=100)
    assert built.n_history_used == 1 and "recent" in built.text and "old" not in built.text
    assert all(len(text) <= 100 for text in calls)
