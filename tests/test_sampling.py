"""Native sampler vs its pure-Python twin (identical tokens), and what sampling must do."""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# the twin is always tested; without the compiled module (LOLLMS_FAST_NO_EXTENSIONS=1) only
# the equivalence tests skip, and in CI (env CI set) a missing native module is a failure
from lollms_fast._native import sampling_py

native: ModuleType | None
try:
    from lollms_fast._native import _sampling as native
except ImportError:
    native = None

IN_CI = bool(os.environ.get("CI"))
MISSING = "the native module lollms_fast._native._sampling is not built"
# in CI the mark does not skip: the tests run and fail (and test_native_module_is_built says why)
needs_native = pytest.mark.skipif(native is None and not IN_CI, reason=MISSING)
TWINS = [pytest.param(native, id="native", marks=needs_native),
         pytest.param(sampling_py, id="python")]


def test_native_module_is_built() -> None:
    if native is None:
        if IN_CI:
            pytest.fail(MISSING + " (CI must build it)")
        pytest.skip(MISSING)


finite_logits = st.floats(-30, 30, width=32, allow_nan=False)
logit_rows = hnp.arrays(np.float32, st.integers(1, 400), elements=finite_logits)


@st.composite
def rows_with_minus_inf(draw: st.DrawFn) -> np.ndarray:
    """Rows where some entries are -inf (llama.cpp's masks, a logit_bias of -inf), never
    all of them."""
    row = draw(hnp.arrays(np.float32, st.integers(1, 400),
                          elements=finite_logits | st.just(float("-inf"))))
    if np.isneginf(row).all():
        row[draw(st.integers(0, len(row) - 1))] = draw(finite_logits)
    return row
sampler_params = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.1, 0.7, 0.9, 1.0, 2.0]),
    "top_k": st.sampled_from([0, 1, 2, 5, 50, 1000]),
    "top_p": st.sampled_from([0.1, 0.5, 0.95, 1.0]),
    "repeat_penalty": st.sampled_from([1.0, 1.1, 1.2, 2.0]),
    "repeat_last_n": st.sampled_from([0, 1, 40, 64]),
    "seed": st.integers(0, 2**64 - 1),
})
# biases: small nudges, -100 bans, +100 forcing, -inf; ids past the row (up to 450 on rows of
# up to 400) are skipped; pairs may repeat an id (the last one wins in both twins)
bias_values = (st.floats(-10, 10, width=32) | st.sampled_from([-100.0, 100.0, float("-inf")]))
logit_biases = (st.none()
                | st.dictionaries(st.integers(0, 450), bias_values, max_size=8)
                | st.lists(st.tuples(st.integers(0, 450), bias_values), max_size=8))
penalised_params = st.fixed_dictionaries({
    "temperature": st.sampled_from([0.0, 0.1, 0.7, 1.0, 2.0]),
    "top_k": st.sampled_from([0, 1, 5, 50, 1000]),
    "top_p": st.sampled_from([0.1, 0.5, 0.95, 1.0]),
    "repeat_penalty": st.sampled_from([1.0, 1.1, 1.3, 0.9]),
    "repeat_last_n": st.sampled_from([0, 1, 8, 64]),
    "seed": st.integers(0, 2**64 - 1),
    "presence_penalty": st.sampled_from([0.0, 0.1, 0.5, 1.7, -0.4])
    | st.floats(-2, 2, width=32),
    "frequency_penalty": st.sampled_from([0.0, 0.1, 0.5, 1.3, -0.2])
    | st.floats(-2, 2, width=32),
    "logit_bias": logit_biases,
})


@needs_native
@given(logit_rows | rows_with_minus_inf())
def test_greedy_twins_agree(row: np.ndarray) -> None:
    assert native is not None
    assert native.greedy(row) == sampling_py.greedy(row) == int(np.argmax(row))


def assert_twins_pick_the_same(row: np.ndarray, params: dict, history: list[int],
                               steps: int) -> list[int]:
    assert native is not None
    a, b = native.Sampler(**params), sampling_py.Sampler(**params)
    a.accept_many(history)
    b.accept_many(history)
    tokens = []
    for _ in range(steps):
        ra, rb = row.copy(), row.copy()
        token_a, token_b = a.sample(ra), b.sample(rb)
        assert token_a == token_b
        assert np.array_equal(ra, rb)  # the same in-place penalty, bit for bit
        a.accept(token_a)
        b.accept(token_b)
        tokens.append(token_a)
    return tokens


@needs_native
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(row=logit_rows, params=sampler_params, history=st.lists(st.integers(0, 450), max_size=80),
       steps=st.integers(1, 4))
def test_sampler_twins_pick_the_same_tokens(row: np.ndarray, params: dict, history: list[int],
                                            steps: int) -> None:
    assert_twins_pick_the_same(row, params, history, steps)


@needs_native
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows_with_minus_inf(), params=sampler_params,
       history=st.lists(st.integers(0, 450), max_size=80), steps=st.integers(1, 4))
def test_sampler_twins_agree_on_minus_inf_logits(row: np.ndarray, params: dict,
                                                 history: list[int], steps: int) -> None:
    tokens = assert_twins_pick_the_same(row, params, history, steps)
    # a -inf logit has probability 0: it is never drawn while a finite one exists
    # (the repeat penalty keeps -inf at -inf and finite values finite)
    assert all(0 <= t < len(row) and not np.isneginf(row[t]) for t in tokens), tokens


@needs_native
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(row=logit_rows | rows_with_minus_inf(), params=penalised_params,
       history=st.lists(st.integers(0, 60) | st.integers(0, 450), max_size=80),
       steps=st.integers(1, 4))
def test_twins_agree_with_presence_frequency_penalties_and_logit_bias(
        row: np.ndarray, params: dict, history: list[int], steps: int) -> None:
    # the history repeats ids (0..60 often), so counts above 1 are common; the rows are
    # compared bit for bit after each call, so the penalised logits, not only the choice
    tokens = assert_twins_pick_the_same(row, params, history, steps)
    banned = {t for t, b in dict(params["logit_bias"] or {}).items() if b == float("-inf")}
    if any(not np.isneginf(row[i]) and i not in banned for i in range(len(row))):
        assert not banned & set(tokens)  # a -inf bias is a ban while anything else is left


@needs_native
def test_twins_agree_on_a_full_size_vocabulary_row() -> None:
    assert native is not None
    rng = np.random.default_rng(7)
    row = (rng.standard_normal(262_144) * 4).astype(np.float32)
    params = dict(temperature=0.9, top_k=50, top_p=0.95, repeat_penalty=1.2, repeat_last_n=40)
    for seed in range(5):
        a, b = native.Sampler(seed=seed, **params), sampling_py.Sampler(seed=seed, **params)
        a.accept_many(range(0, 4000, 100))
        b.accept_many(range(0, 4000, 100))
        assert a.sample(row.copy()) == b.sample(row.copy())
    # with the new penalties and a bias, the penalised row is equal bit for bit too
    extra = dict(presence_penalty=0.4, frequency_penalty=0.3,
                 logit_bias={5: 2.5, 100: -100.0, 262_143: 1.0})
    for seed in range(3):
        a = native.Sampler(seed=seed, **params, **extra)
        b = sampling_py.Sampler(seed=seed, **params, **extra)
        a.accept_many([100, 200, 200, 300, 300, 300] * 6)
        b.accept_many([100, 200, 200, 300, 300, 300] * 6)
        ra, rb = row.copy(), row.copy()
        assert a.sample(ra) == b.sample(rb)
        assert np.array_equal(ra, rb)


@pytest.mark.parametrize("impl", TWINS, ids=["native", "python"])
class TestSampler:
    def test_temperature_zero_is_greedy(self, impl) -> None:
        row = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
        assert impl.Sampler(temperature=0.0, repeat_penalty=1.0).sample(row) == 1

    def test_top_k_one_is_greedy_at_any_temperature(self, impl) -> None:
        row = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
        for seed in range(20):
            assert impl.Sampler(temperature=5.0, top_k=1, seed=seed).sample(row.copy()) == 1

    def test_only_top_k_tokens_are_ever_drawn(self, impl) -> None:
        row = np.arange(100, dtype=np.float32) / 10  # the best are the highest ids
        s = impl.Sampler(temperature=50.0, top_k=3, top_p=1.0, repeat_penalty=1.0, seed=3)
        drawn = {s.sample(row.copy()) for _ in range(300)}
        assert drawn == {97, 98, 99}

    def test_top_p_keeps_the_smallest_head_holding_the_mass(self, impl) -> None:
        # probabilities at temperature 1: about 0.84, 0.11, 0.04, ...
        row = np.array([5.0, 3.0, 2.0, 0.0, 0.0], dtype=np.float32)
        s = impl.Sampler(temperature=1.0, top_k=0, top_p=0.9, repeat_penalty=1.0, seed=1)
        assert {s.sample(row.copy()) for _ in range(300)} == {0, 1}

    def test_draws_follow_the_softmax(self, impl) -> None:
        row = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
        s = impl.Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=11)
        counts = np.bincount([s.sample(row.copy()) for _ in range(3000)], minlength=3) / 3000
        assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.04)

    def test_same_seed_same_stream_other_seed_other_stream(self, impl) -> None:
        row = np.zeros(1000, dtype=np.float32)

        def draws(seed: int) -> list[int]:
            s = impl.Sampler(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=seed)
            return [s.sample(row.copy()) for _ in range(20)]

        assert draws(42) == draws(42)
        assert draws(42) != draws(43)

    def test_repeat_penalty_applies_once_per_distinct_recent_token(self, impl) -> None:
        row = np.array([2.5, 2.0, -1.0, 0.5], dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_penalty=2.0, repeat_last_n=3)
        s.accept_many([3, 0, 0, 2])  # the window keeps the last 3: 0, 0, 2
        assert s.sample(row) == 1
        assert row.tolist() == [1.25, 2.0, -2.0, 0.5]

    def test_minus_inf_logits_are_never_drawn(self, impl) -> None:
        inf = float("-inf")
        row = np.array([inf, 1.0, inf, 0.5, inf], dtype=np.float32)
        s = impl.Sampler(temperature=5.0, top_k=0, top_p=1.0, repeat_penalty=1.3,
                         repeat_last_n=8, seed=5)
        s.accept_many([0, 1])  # a penalised -inf stays -inf
        assert {s.sample(row.copy()) for _ in range(200)} == {1, 3}
        assert impl.Sampler(temperature=0.0).sample(np.array([inf, inf, -2.0], np.float32)) == 2

    def test_empty_row(self, impl) -> None:
        assert impl.Sampler().sample(np.zeros(0, dtype=np.float32)) == -1

    def test_frequency_penalty_scales_with_the_count(self, impl) -> None:
        row = np.zeros(5, dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_last_n=8, frequency_penalty=0.5)
        s.accept_many([1, 1, 1, 2, 4, 4])
        s.sample(row)
        assert row.tolist() == [0.0, -1.5, -0.5, 0.0, -1.0]

    def test_presence_penalty_does_not_depend_on_the_count(self, impl) -> None:
        row = np.zeros(5, dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_last_n=8, presence_penalty=0.75)
        s.accept_many([1, 1, 1, 2, 4, 4])
        s.sample(row)
        assert row.tolist() == [0.0, -0.75, -0.75, 0.0, -0.75]

    def test_penalties_follow_the_repeat_penalty_and_count_only_the_window(self, impl) -> None:
        row = np.array([4.0, -1.0, 3.0, 1.0], dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_penalty=2.0, repeat_last_n=4,
                         presence_penalty=0.25, frequency_penalty=0.5)
        s.accept_many([3, 3, 0, 0, 0, 1])  # the window keeps 0, 0, 0, 1
        assert s.sample(row) == 2
        # 4 / 2 - (3 * 0.5 + 0.25); -1 * 2 - (1 * 0.5 + 0.25); 2 and 3 are outside the window
        assert row.tolist() == [0.25, -2.75, 3.0, 1.0]
        assert (s.presence_penalty, s.frequency_penalty) == (0.25, 0.5)

    def test_no_penalty_pass_at_the_neutral_settings(self, impl) -> None:
        row = np.array([-0.0, 1.0, 2.0], dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_penalty=1.0, presence_penalty=0.0,
                         frequency_penalty=0.0)
        s.accept_many([0, 1, 2])
        assert s.sample(row) == 2
        assert row.tolist() == [-0.0, 1.0, 2.0] and np.signbit(row[0])

    def test_logit_bias_bans_and_forces(self, impl) -> None:
        row = np.array([3.0, 2.0, 1.0, 0.0, -1.0], dtype=np.float32)
        banned = impl.Sampler(temperature=1.5, top_k=0, top_p=1.0, seed=2,
                              logit_bias={0: float("-inf"), 1: -100.0})
        assert {banned.sample(row.copy()) for _ in range(300)} == {2, 3, 4}
        forced = impl.Sampler(temperature=1.5, top_k=40, top_p=0.95, seed=2,
                              logit_bias=[(4, 100.0)])
        assert {forced.sample(row.copy()) for _ in range(300)} == {4}
        assert impl.Sampler(logit_bias={0: float("-inf")}).sample(row.copy()) == 1

    def test_logit_bias_comes_before_the_penalties(self, impl) -> None:
        row = np.array([1.0, 0.0], dtype=np.float32)
        s = impl.Sampler(temperature=0.0, repeat_penalty=2.0, logit_bias={0: 1.0})
        s.accept(0)
        s.sample(row)
        assert row.tolist() == [1.0, 0.0]  # (1 + 1) / 2; after the penalty it would be 1.5

    def test_logit_bias_forms_and_ids_outside_the_row(self, impl) -> None:
        row = np.arange(4, dtype=np.float32)
        pairs = [(0, 1.0), (0, 5.0), (9, 3.0), (-1, 2.0), (2**40, 1.0)]  # the last 0 wins
        for bias in (pairs, dict(pairs)):
            r = row.copy()
            assert impl.Sampler(temperature=0.0, logit_bias=bias).sample(r) == 0
            assert r.tolist() == [5.0, 1.0, 2.0, 3.0]


def close(a: float, b: float) -> bool:
    return bool(a == b or abs(a - b) <= 1e-5)  # a == b: both -inf


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    top = x.max()
    return (x - top) - np.log(np.sum(np.exp(x - top)))


@pytest.mark.parametrize("impl", TWINS, ids=["native", "python"])
class TestTopLogprobs:
    @settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(row=logit_rows | rows_with_minus_inf(), data=st.data())
    def test_matches_a_numpy_log_softmax(self, impl, row: np.ndarray,
                                         data: st.DataObject) -> None:
        token = data.draw(st.integers(0, len(row) - 1))
        n = data.draw(st.integers(0, len(row) + 3))
        before = row.copy()
        logprob, best = impl.top_logprobs(row, token, n)
        assert np.array_equal(row, before)  # the row is not modified
        expected = log_softmax(row)
        order = np.lexsort((np.arange(len(row)), -row))[: min(n, len(row))]
        assert close(logprob, expected[token])
        assert [t for t, _ in best] == order.tolist()  # logit descending, id ascending
        for t, lp in best:
            assert close(lp, expected[t])
        assert all(isinstance(t, int) and isinstance(lp, float) for t, lp in best)

    def test_a_small_row(self, impl) -> None:
        row = np.log(np.array([0.5, 0.125, 0.25, 0.125], dtype=np.float32))
        logprob, best = impl.top_logprobs(row, 3, 3)
        assert logprob == pytest.approx(np.log(0.125))
        assert [t for t, _ in best] == [0, 2, 1]  # 1 and 3 tie: the lower id first
        assert [lp for _, lp in best] == pytest.approx(np.log([0.5, 0.25, 0.125]).tolist())
        assert impl.top_logprobs(row, 0, 0)[1] == []
        assert len(impl.top_logprobs(row, 0, 100)[1]) == 4

    def test_probabilities_sum_to_one_on_a_full_size_row(self, impl) -> None:
        row = (np.random.default_rng(3).standard_normal(262_144) * 4).astype(np.float32)
        _, best = impl.top_logprobs(row, 0, len(row))
        assert sum(np.exp(lp) for _, lp in best) == pytest.approx(1.0, abs=1e-9)
        assert best[0][0] == int(np.argmax(row))

    def test_bad_arguments(self, impl) -> None:
        row = np.zeros(3, dtype=np.float32)
        for token in (-1, 3, 2**70):
            with pytest.raises(IndexError):
                impl.top_logprobs(row, token, 1)
        with pytest.raises(ValueError):
            impl.top_logprobs(row, 0, -1)
        with pytest.raises(IndexError):
            impl.top_logprobs(np.zeros(0, dtype=np.float32), 0, 0)


@needs_native
@settings(max_examples=200)
@given(row=logit_rows | rows_with_minus_inf(), data=st.data())
def test_top_logprobs_twins_agree(row: np.ndarray, data: st.DataObject) -> None:
    assert native is not None
    token = data.draw(st.integers(0, len(row) - 1))
    n = data.draw(st.integers(0, 30))
    a, b = native.top_logprobs(row, token, n), sampling_py.top_logprobs(row, token, n)
    # the ids are exact; the logprobs are sums of exps in different orders: a tolerance
    assert [t for t, _ in a[1]] == [t for t, _ in b[1]]
    assert np.allclose([a[0]] + [lp for _, lp in a[1]], [b[0]] + [lp for _, lp in b[1]],
                       rtol=0, atol=1e-5)


@needs_native
@settings(max_examples=60)
@given(size=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), top_k=st.integers(1, 300))
def test_twins_agree_on_long_rows_full_of_ties(size: int, seed: int, top_k: int) -> None:
    assert native is not None
    # the native scans go block by block: ties across and inside blocks must keep the
    # lowest id first, as the twin's stable sort does
    row = np.random.default_rng(seed).integers(-3, 3, size=size).astype(np.float32)
    assert native.greedy(row) == sampling_py.greedy(row)
    params = dict(temperature=0.8, top_k=top_k, top_p=0.9, repeat_penalty=1.0, seed=seed)
    assert (native.Sampler(**params).sample(row.copy())
            == sampling_py.Sampler(**params).sample(row.copy()))
