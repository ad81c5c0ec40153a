"""Prompt building and token trimming.

These tests use a deterministic character tokenizer (one token per character, BOS = -1) so
the budgets are easy to reason about; real-model prompts are covered by the chat tests."""

from __future__ import annotations

import pytest

from lollms_fast.services.prompt import ContextOverflow, PromptStyle, Turn, build_prompt

STYLE = PromptStyle(conditioning="COND\n", user_prefix="### user:\n",
                    ai_prefix="### lollms:\n", link="\n", ai_name="lollms")


def char_tokenize(text: str, add_bos: bool) -> list[int]:
    return ([-1] if add_bos else []) + [ord(c) for c in text]


HISTORY = [Turn("lollms", "Welcome!"), Turn("user", "hi"), Turn("lollms", "hello there")]


def test_text_matches_the_2023_layout() -> None:
    built = build_prompt(STYLE, HISTORY, "how are you?", char_tokenize, budget=10_000,
                         max_history=5)
    assert built.text == ("COND\n### lollms:\nWelcome!\n### user:\nhi\n### lollms:\nhello there"
                          "\n### user:\nhow are you?\n### lollms:\n")
    assert built.tokens == char_tokenize(built.text, True)
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
