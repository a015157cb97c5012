"""dlib's slope test: the vectorised counts equal a slow transcription of dlib, and the detector behaves."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.detectors import make_detector
from server.detectors.base import Decision
from server.detectors.slope import (
    Slope,
    clearly_decreasing,
    count_steps_without_decrease,
    count_steps_without_decrease_robust,
    probability_of_decrease,
)

# --- a slow, obviously correct reference: dlib's loops with exact least squares -------------------------------


class ExactRegression:
    """dlib ``running_gradient`` with exact (rational) least squares instead of recursive least squares."""

    def __init__(self) -> None:
        self.ys: list[Fraction] = []

    def add(self, y: float) -> None:
        self.ys.append(Fraction(y))

    def probability_gradient_greater_than_zero(self) -> float:
        n = len(self.ys)
        xs = [Fraction(i) for i in range(n)]
        mx, my = sum(xs) / n, sum(self.ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, self.ys, strict=True))
        slope = sxy / sxx
        intercept = my - slope * mx
        rss = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, self.ys, strict=True))
        se = math.sqrt(float(rss / (n - 2)) * 12.0 / (n**3 - n))
        m = float(slope)
        # dlib normal_cdf(0, mean=m, stddev=se), then 1 - that.
        if se == 0:
            less = 0.0 if m > 0 else 1.0 if m < 0 else 0.5  # value 0 above / below the mean
        else:
            less = 0.5 * math.erfc(-((0 - m) / se) / math.sqrt(2.0))
        return 1 - less


def reference_count(values: list[float], p: float) -> int:
    g, count = ExactRegression(), 0
    for j, y in enumerate(reversed(values), start=1):
        g.add(y)
        if len(g.ys) > 2 and g.probability_gradient_greater_than_zero() < p:
            count = j
    return count


def reference_count_robust(values: list[float], p: float, quantile_discard: float) -> int:
    if not values:
        return 0
    index = int(Decimal((len(values) - 1) * (1 - quantile_discard)).to_integral_value(ROUND_HALF_UP))
    threshold = sorted(values)[index]
    g, count = ExactRegression(), 0
    for j, y in enumerate(reversed(values), start=1):  # j advances on every value, kept or not
        if y <= threshold:
            g.add(y)
        if len(g.ys) > 2 and g.probability_gradient_greater_than_zero() < p:
            count = j
    return count


# Values on a grid of 1/1000 (loss-like magnitudes, exact repeats likely), so that the exact and the float
# computations only disagree on a measure-zero boundary.
grid_values = st.lists(st.integers(-5000, 5000).map(lambda i: i / 1000), min_size=0, max_size=60)


@st.composite
def trend_series(draw: st.DrawFn) -> list[float]:
    """A noisy line with a random slope (sometimes spikes): counts anywhere between 0 and the length."""
    n = draw(st.integers(3, 150))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    slope = draw(st.sampled_from([-0.05, -0.005, -0.0005, 0.0, 0.001]))
    y = 1.0 + slope * np.arange(n) + rng.normal(0, 0.05, n)
    if draw(st.booleans()):
        y[rng.integers(0, n, size=max(1, n // 20))] += 10.0
    return [float(v) for v in y]


probabilities = st.sampled_from([0.51, 0.6, 0.9, 0.99])


@pytest.mark.slow  # 150 exact-fraction reference counts
@settings(max_examples=150, deadline=None)
@given(values=st.one_of(grid_values, trend_series()), p=probabilities)
def test_count_matches_reference(values: list[float], p: float) -> None:
    assert count_steps_without_decrease(np.array(values, dtype=float), p) == reference_count(values, p)


@pytest.mark.slow  # 150 exact-fraction reference counts
@settings(max_examples=150, deadline=None)
@given(values=st.one_of(grid_values, trend_series()), p=probabilities, q=st.sampled_from([0.0, 0.1, 0.25, 0.5]))
def test_robust_count_matches_reference(values: list[float], p: float, q: float) -> None:
    got = count_steps_without_decrease_robust(np.array(values, dtype=float), p, q)
    assert got == reference_count_robust(values, p, q)


@settings(max_examples=150, deadline=None)
@given(values=st.one_of(grid_values, trend_series()), p=probabilities)
def test_precheck_only_skips_windows_whose_count_is_short(values: list[float], p: float) -> None:
    array = np.array(values, dtype=float)
    count = count_steps_without_decrease(array, p)
    if clearly_decreasing(array, p):
        assert count < len(values)
    elif len(values) >= 3:
        # not clearly decreasing: either the count reaches the end, or the full window is a near miss
        full_probability, _ = probability_of_decrease(array)
        assert count == len(values) or full_probability >= p - 1e-6


def test_precheck_is_not_trivial() -> None:
    rng = np.random.default_rng(9)
    assert clearly_decreasing(1.0 - 0.001 * np.arange(2000) + rng.normal(0, 0.05, 2000))
    assert not clearly_decreasing(1.0 + rng.normal(0, 0.05, 2000) + 0.00001 * np.arange(2000))


def test_count_extremes() -> None:
    assert count_steps_without_decrease(np.array([5.0] * 40)) == 40  # constant: P = 0.5 < 0.51 everywhere
    assert count_steps_without_decrease(np.arange(40.0)[::-1].copy()) == 0  # exact decrease: never flat
    assert count_steps_without_decrease(np.arange(40.0)) == 40  # exact increase: flat or worse everywhere
    # a series that falls and then sits still: only the flat tail counts
    series = np.concatenate([np.linspace(10, 1, 50), np.full(30, 1.0)])
    assert 30 <= count_steps_without_decrease(series) < 50


def test_probability_of_decrease() -> None:
    rng = np.random.default_rng(3)
    falling = 1 - 0.01 * np.arange(300) + rng.normal(0, 0.05, 300)
    p, slope = probability_of_decrease(falling)
    assert p > 0.999 and math.isclose(slope, -0.01, rel_tol=0.1)
    assert probability_of_decrease(np.array([1.0, 1.0, 1.0])) == (0.5, 0.0)


# --- the detector ---------------------------------------------------------------------------------------------


def feed(detector: Slope, values: np.ndarray, first_step: int = 0) -> list[Decision]:
    return [d for i, v in enumerate(values.tolist()) for d in detector.update(first_step + i, v)]


def slope_detector(**params: object) -> Slope:
    detector = make_detector("slope", params)
    assert isinstance(detector, Slope)
    return detector


def test_clearly_decreasing_noisy_series_gives_no_decay() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    loss = 3.0 * np.exp(-np.arange(n) / 8000) + 0.5 + rng.normal(0, 0.05, n)  # falls 0.4% per 2000 steps at the end
    assert feed(slope_detector(initial_lr=0.1), loss) == []


def test_flat_noisy_series_decays_after_about_a_window() -> None:
    rng = np.random.default_rng(2)
    window, n = 2000, 12_000
    loss = 0.7 + rng.normal(0, 0.05, n)
    decisions = feed(slope_detector(initial_lr=0.1, min_lr=0.0), loss, first_step=1000)
    assert decisions, "a flat series must end the stage"
    first = decisions[0]
    assert window - 1 <= first.step - 1000 <= window + 200  # the window must be full, then a check or a few
    assert first.action == "decay" and first.factor == 0.1 and first.lr == 0.1 * 0.1
    ev = first.evidence
    assert ev.statistic == "steps without decrease" and ev.value == ev.threshold == window
    assert ev.window == (first.step - window + 1, first.step)
    p_decrease = ev.details["P(slope<0)"]
    assert isinstance(p_decrease, float) and p_decrease < 0.51
    # after a decay dlib drops 400 + 2000/10 values: the window refills before the next decision
    gaps = np.diff([d.step for d in decisions])
    assert len(gaps) >= 3 and (gaps >= 600).all()


def test_robust_check_ignores_spikes_of_a_decreasing_series() -> None:
    rng = np.random.default_rng(4)
    window = 500
    loss = 2.0 - 0.0004 * np.arange(window) + rng.normal(0, 0.02, window)  # falls 0.2 over the window
    loss[-8:] += 50.0  # a few huge spikes at the end: the plain fit now rises
    plain = count_steps_without_decrease(loss)
    robust = count_steps_without_decrease_robust(loss)
    assert plain == window  # the plain rule alone would call this a plateau ...
    assert robust < window  # ... dlib's second look, without the top 10%, sees the decrease
    # the detector applies both, checking at every point here (budget per point > window)
    assert feed(slope_detector(window=window, budget_per_point=window + 1), loss) == []

    # the same spikes on a series that has stopped falling (it even creeps up): both looks agree, stage over
    flat = 1.0 + 0.0001 * np.arange(window) + rng.normal(0, 0.02, window)
    flat[-8:] += 50.0
    assert count_steps_without_decrease(flat) == window
    assert count_steps_without_decrease_robust(flat) == window
    decisions = feed(slope_detector(window=window, budget_per_point=window + 1), flat)
    assert [(d.step, d.action) for d in decisions] == [(window - 1, "decay")]


def test_stop_when_the_next_lr_would_be_below_min_lr() -> None:
    rng = np.random.default_rng(5)
    loss = 0.3 + rng.normal(0, 0.05, 20_000)
    decisions = feed(slope_detector(initial_lr=1e-3, min_lr=1e-5, window=1000), loss)
    actions = [d.action for d in decisions]
    assert actions == ["decay", "decay", "stop"]  # 1e-3 -> 1e-4 -> 1e-5 (>= min_lr), then 1e-6 < 1e-5
    assert decisions[-1].factor == 1.0 and decisions[-1].lr == decisions[-2].lr
    assert "min_lr" in decisions[-1].evidence.explanation
    # without a known LR there is no stop, only decays
    assert {d.action for d in feed(slope_detector(window=1000), loss)} == {"decay"}


def test_non_finite_values_are_ignored() -> None:
    rng = np.random.default_rng(6)
    loss = 1.0 + rng.normal(0, 0.05, 300)
    a, b = slope_detector(window=100), slope_detector(window=100)
    feed(a, loss)
    for i, v in enumerate(loss.tolist()):
        b.update(2 * i, v)
        b.update(2 * i + 1, [math.nan, math.inf, -math.inf][i % 3])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["values"] == sb["values"] and sa["budget"] == sb["budget"]
