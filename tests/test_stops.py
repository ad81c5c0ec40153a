"""Native stop detector vs its pure-Python twin, and the streaming rules it enforces."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# the twin is always tested; without the compiled module (LOLLMS_FAST_NO_EXTENSIONS=1) only
# the equivalence tests skip, and in CI (env CI set) a missing native module is a failure
from lollms_fast._native import stops_py

native: ModuleType | None
try:
    from lollms_fast._native import _stops as native
except ImportError:
    native = None

IN_CI = bool(os.environ.get("CI"))
MISSING = "the native module lollms_fast._native._stops is not built"
# in CI the mark does not skip: the tests run and fail (and test_native_module_is_built says why)
needs_native = pytest.mark.skipif(native is None and not IN_CI, reason=MISSING)
TWINS = [pytest.param(native, id="native", marks=needs_native),
         pytest.param(stops_py, id="python")]


def test_native_module_is_built() -> None:
    if native is None:
        if IN_CI:
            pytest.fail(MISSING + " (CI must build it)")
        pytest.skip(MISSING)


# ASCII in both cases, accents, CJK and 4-byte emoji, so byte splits land inside characters
alphabet = st.sampled_from(list("abcABCxyzXYZ :!\n") + ["é", "É", "ß", "中", "文", "😀", "🦙",
                                                     "\u200d"])
texts = st.text(alphabet, max_size=40)


def random_case(text: str, flips: list[bool]) -> str:
    """`text` with the case of some ASCII letters swapped (the detector folds ASCII case)."""
    return "".join(ch.swapcase() if ch.isascii() and flip else ch
                   for ch, flip in zip(text, flips + [False] * len(text), strict=False))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run(impl, anti_prompts, pieces: list[bytes], case_sensitive: bool = False
        ) -> tuple[list[str], str, object]:
    d = impl.StopDetector(anti_prompts, case_sensitive=case_sensitive)
    out = [d.feed(p) for p in pieces]
    return out, d.finish(), d


@needs_native
@given(st.binary(max_size=12))
def test_complete_utf8_len_twins_agree(data: bytes) -> None:
    assert native is not None
    assert native.complete_utf8_len(data) == stops_py.complete_utf8_len(data)


@needs_native
@settings(max_examples=300)
@given(text=texts, stops=st.lists(st.text(alphabet, min_size=1, max_size=6), max_size=3),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_twins_agree_and_never_emit_broken_utf8(text: str, stops: list[str],
                                                cuts: list[int]) -> None:
    assert native is not None
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


@needs_native
@settings(max_examples=300)
@given(before=texts, stop=st.text(alphabet, min_size=1, max_size=6), after=texts,
       flips=st.lists(st.booleans(), max_size=8), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_an_anti_prompt_in_another_case_is_found(before: str, stop: str, after: str,
                                                 flips: list[bool], cuts: list[int]) -> None:
    """The anti-prompt appears in the text with some letters in the other case: both twins
    stop there (or earlier, if `before` already holds it in some case), and agree."""
    assert native is not None
    written = random_case(stop, flips)
    data = (before + written + after).encode()
    out_n, tail_n, dn = run(native, [stop], split_at(data, cuts))
    out_p, tail_p, dp = run(stops_py, [stop], split_at(data, cuts))
    assert (out_n, tail_n, dn.stopped, dn.cut) == (out_p, tail_p, dp.stopped, dp.cut)
    assert dn.stopped
    assert dn.cut <= len(before.encode())
    assert "".join(out_n) + tail_n == data[: dn.cut].decode()


@needs_native
@settings(max_examples=300)
@given(text=texts, stops=st.lists(st.text(alphabet, min_size=1, max_size=6), max_size=3),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_case_sensitive_twins_agree(text: str, stops: list[str], cuts: list[int]) -> None:
    """OpenAI `stop` sequences match exactly: both twins agree, and the stop is the first
    exact occurrence of one of them."""
    assert native is not None
    pieces = split_at(text.encode(), cuts)
    out_n, tail_n, dn = run(native, stops, pieces, case_sensitive=True)
    out_p, tail_p, dp = run(stops_py, stops, pieces, case_sensitive=True)
    assert (out_n, tail_n, dn.stopped, dn.cut) == (out_p, tail_p, dp.stopped, dp.cut)
    data = text.encode()
    found = [at for at in (data.find(s.encode()) for s in stops) if at >= 0]
    assert dn.cut == (min(found) if found else -1)


@pytest.mark.parametrize("impl", TWINS)
def test_case_sensitive_ignores_other_case(impl) -> None:
    out, tail, d = run(impl, ["User:"], [b"the uSER: said ", b"User: stop"], case_sensitive=True)
    assert "".join(out) + tail == "the uSER: said "
    assert d.stopped and d.cut == len(b"the uSER: said ")


@pytest.mark.parametrize("impl", TWINS)
def test_anti_prompt_split_at_every_position(impl) -> None:
    before, stop, after = "Sure 😀 中文 ok", "!@#User:", " more text"
    data = (before + "!@#uSER:" + after).encode()  # matched case-insensitively
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            out, tail, d = run(impl, [stop], [data[:i], data[i:j], data[j:]])
            assert "".join(out) + tail == before
            assert d.stopped and d.cut == len(before.encode())


@pytest.mark.parametrize("impl", TWINS)
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
