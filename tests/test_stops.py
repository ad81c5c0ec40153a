"""Native stop detector vs its pure-Python twin, and the streaming rules it enforces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lollms_fast._native import stops_py

native = pytest.importorskip("lollms_fast._native._stops")
TWINS = [native, stops_py]

# ASCII, accents, CJK and 4-byte emoji, so byte splits land inside characters
alphabet = st.sampled_from(list("abcXYZ :!\n") + ["é", "ß", "中", "文", "😀", "🦙", "\u200d"])
texts = st.text(alphabet, max_size=40)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def run(impl, anti_prompts, pieces: list[bytes]) -> tuple[list[str], str, object]:
    d = impl.StopDetector(anti_prompts)
    out = [d.feed(p) for p in pieces]
    return out, d.finish(), d


@given(st.binary(max_size=12))
def test_complete_utf8_len_twins_agree(data: bytes) -> None:
    assert native.complete_utf8_len(data) == stops_py.complete_utf8_len(data)


@settings(max_examples=300)
@given(text=texts, stops=st.lists(st.text(alphabet, min_size=1, max_size=6), max_size=3),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_twins_agree_and_never_emit_broken_utf8(text: str, stops: list[str],
                                                cuts: list[int]) -> None:
    pieces = split_at(text.encode(), cuts)
    out_n, tail_n, dn = run(native, stops, pieces)
    out_p, tail_p, dp = run(stops_py, stops, pieces)
    assert (out_n, tail_n, dn.stopped, dn.cut) == (out_p, tail_p, dp.stopped, dp.cut)
    shown = "".join(out_n) + tail_n
    assert "\ufffd" not in shown  # every piece was whole characters
    if not dn.stopped:
        assert shown == text
    else:
        assert shown.encode() == text.encode()[: dn.cut]


@pytest.mark.parametrize("impl", TWINS, ids=["native", "python"])
def test_anti_prompt_split_at_every_position(impl) -> None:
    before, stop, after = "Sure 😀 中文 ok", "!@#User:", " more text"
    data = (before + "!@#uSER:" + after).encode()  # matched case-insensitively
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            out, tail, d = run(impl, [stop], [data[:i], data[i:j], data[j:]])
            assert "".join(out) + tail == before
            assert d.stopped and d.cut == len(before.encode())


@pytest.mark.parametrize("impl", TWINS, ids=["native", "python"])
class TestStopDetector:
    def test_holds_back_a_possible_anti_prompt_then_releases_it(self, impl) -> None:
        d = impl.StopDetector(["User:"])
        assert d.feed(b"Hi Us") == "Hi "
        assert d.feed(b"e") == ""
        assert d.feed(b"d") == "Used"  # no longer an anti-prompt: shown late, never lost
        assert not d.stopped

    def test_earliest_anti_prompt_wins(self, impl) -> None:
        d = impl.StopDetector(["### ", "\nUser"])
        assert d.feed(b"ok\nUser### ") == "ok"
        assert d.stopped and d.cut == 2
        assert d.feed(b"ignored") == "" and d.finish() == ""

    def test_incomplete_character_waits_for_its_last_byte(self, impl) -> None:
        d = impl.StopDetector([])
        assert d.feed(b"a\xf0\x9f") == "a"
        assert d.feed(b"\x98") == ""
        assert d.feed(b"\x80b") == "😀b"

    def test_finish_flushes_what_was_held(self, impl) -> None:
        d = impl.StopDetector(["</s>"])
        assert d.feed(b"end </") == "end "
        assert d.finish() == "</"

    def test_invalid_bytes_become_replacement_characters(self, impl) -> None:
        d = impl.StopDetector([])
        assert d.feed(b"a\xffb") == "a\ufffdb"
