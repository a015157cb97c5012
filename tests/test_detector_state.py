"""Every registered detector continues exactly after its state went through JSON; bad parameters are named.

The detectors are taken from the registry after ``make_detector`` has loaded the built-in ones, so a detector
added to the package is covered without a change here (with its default parameters unless listed below).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.detectors import DETECTORS, DetectorError, make_detector
from server.detectors.base import Decision, Detector

make_detector("plateau")  # loads every built-in detector into DETECTORS
NAMES = sorted(DETECTORS)

# Small windows so that decisions happen within a few thousand points; other detectors use their defaults.
PARAMS: dict[str, dict[str, Any]] = {
    "plateau": {"patience": 5, "cooldown": 2, "threshold": 1e-3},
    "slope": {"window": 60, "dump_amount": 10, "budget_per_point": 20, "min_lr": 1e-4},
    "stationarity": {"warmup": 50, "min_samples": 100, "leak_ratio": 2, "test_every": 10, "min_lr": 1e-5},
}
# What each detector watches: a loss, or (stationarity) the optimizer statistic Delta, which hovers around 0.
SERIES_KIND = {"stationarity": "delta"}


def series(kind: str, n: int, seed: int) -> list[float]:
    """Stages of a training loss (fall, then a noisy plateau) with a spike and a NaN; or a Delta series that
    alternates drifting and zero-mean stretches. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    if kind == "delta":
        out = np.empty(n)
        for start in range(0, n, 400):
            stretch = out[start : start + 400]
            drift = rng.choice([0.0, 0.0, 2.0])
            stretch[:] = drift * np.linspace(1, 0, stretch.size) + rng.normal(0, 1, stretch.size)
    else:
        steps = np.arange(n)
        stage = steps // 300
        out = 0.3 + 2.0 * np.exp(-(steps % 300) / 40) * 0.5**stage + rng.normal(0, 0.05, n)
    values = out.tolist()
    if n > 10:
        values[rng.integers(0, n)] = 25.0
        values[rng.integers(0, n)] = float("nan")
    return values


def encode(decisions: list[Decision]) -> list[str]:
    # Strict JSON (no NaN): what the server stores and sends.
    return [json.dumps(d.to_dict(), sort_keys=True, allow_nan=False) for d in decisions]


def feed(detector: Detector[Any], values: list[float], first: int, last: int) -> list[Decision]:
    return [d for i in range(first, last) for d in detector.update(3 * i + 1, values[i])]


def build(name: str, initial_lr: float | None) -> Detector[Any]:
    params = dict(PARAMS.get(name, {}))
    if initial_lr is not None:
        params["initial_lr"] = initial_lr
    return make_detector(name, params)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None)
@given(
    # Mostly long series (hypothesis favours small integers, which would rarely reach a decision).
    n=st.one_of(st.sampled_from([0, 1, 2, 9]), st.integers(4, 25).map(lambda k: 100 * k)),
    seed=st.integers(0, 2**32 - 1),
    cut=st.floats(0, 1),
    initial_lr=st.sampled_from([None, 0.1, 1.0]),
)
def test_state_round_trip_changes_no_decision(
    name: str, n: int, seed: int, cut: float, initial_lr: float | None
) -> None:
    values = series(SERIES_KIND.get(name, "loss"), n, seed)
    at = int(cut * n)

    whole = build(name, initial_lr)
    expected = encode(feed(whole, values, 0, n))

    first = build(name, initial_lr)
    got = encode(feed(first, values, 0, at))
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    second = build(name, initial_lr)
    second.load_state_dict(state)
    got += encode(feed(second, values, at, n))

    assert got == expected
    assert json.dumps(second.state_dict(), sort_keys=True, allow_nan=False) == json.dumps(
        whole.state_dict(), sort_keys=True, allow_nan=False
    )


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_not_vacuous(name: str) -> None:
    """The series above make every detector decide, several times, and a cut in the middle of it all
    (between decisions) still gives the same decisions."""
    values = series(SERIES_KIND.get(name, "loss"), 3000, seed=11)
    whole = build(name, 0.1)
    expected = feed(whole, values, 0, len(values))
    assert len(expected) >= 2, f"{name}: no decisions on the test series, the round-trip test proves nothing"
    for cut in (expected[0].step // 3, (expected[0].step + expected[1].step) // 6, len(values) - 1):
        first = build(name, 0.1)
        got = feed(first, values, 0, cut)
        second = build(name, 0.1)
        second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
        got += feed(second, values, cut, len(values))
        assert encode(got) == encode(expected)


def test_unknown_detector_is_named() -> None:
    with pytest.raises(DetectorError, match="'no-such-detector'"):
        make_detector("no-such-detector")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_named(name: str) -> None:
    with pytest.raises(DetectorError, match="bogus_knob") as info:
        make_detector(name, {"bogus_knob": 1})
    assert name in str(info.value)


OUT_OF_RANGE: dict[str, list[tuple[str, Any]]] = {
    "plateau": [("factor", 1.0), ("factor", 0.0), ("patience", -1), ("mode", "up"), ("threshold_mode", "pct")],
    "slope": [("probability", 0.5), ("probability", 1.0), ("window", 2), ("factor", 1.5), ("min_lr", -1.0)],
    "stationarity": [("significance", 1.0), ("min_samples", 10), ("drop_factor", 1.0), ("var_mode", "mb")],
}


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [(name, "initial_lr", -0.1) for name in NAMES]
    + [(name, field, value) for name, cases in OUT_OF_RANGE.items() for field, value in cases],
)
def test_out_of_range_value_is_named(name: str, field: str, value: Any) -> None:
    with pytest.raises(DetectorError, match=field) as info:
        make_detector(name, {field: value})
    assert name in str(info.value)
