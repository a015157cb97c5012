"""AutoDecay on curves with a known plateau onset, steady declines that must not trigger, and its limits."""

from __future__ import annotations

import numpy as np
import pytest

from server.detectors import make_detector
from server.detectors.base import Decision

PER_STEP = {"preset": "step"}


def replay(steps: np.ndarray, values: np.ndarray, **params: object) -> list[Decision]:
    detector = make_detector("autodecay", {"initial_lr": 0.1, **params})
    decisions: list[Decision] = []
    for step, value in zip(steps, values, strict=True):
        decisions += detector.update(int(step), float(value))
    return decisions


def plateau_curve(rng: np.random.Generator, n: int, tau: float, noise: float) -> np.ndarray:
    t = np.arange(n)
    return 0.3 + 2.0 * np.exp(-t / tau) + rng.normal(0, noise, n)


@pytest.mark.parametrize("seed", range(5))
def test_per_epoch_plateau_is_found_after_its_onset(seed: int) -> None:
    rng = np.random.default_rng(seed)
    epochs = np.arange(80)
    loss = plateau_curve(rng, 80, tau=6.0, noise=0.01)
    onset = 6.0 * np.log(2.0 / 0.01)  # the decline is lost in the noise from about here (epoch ~32)
    decisions = replay(epochs * 100, loss)
    assert decisions, "a clear plateau must end the stage"
    first = decisions[0]
    assert first.action == "decay"
    assert first.factor == 0.1
    assert first.lr == pytest.approx(0.01)
    assert 0.5 * onset * 100 <= first.step <= (onset + 25) * 100
    assert first.evidence.value < first.evidence.threshold
    assert "has ended" in first.evidence.explanation
    assert first.evidence.window[0] < first.evidence.window[1] == first.step


@pytest.mark.parametrize("seed", range(5))
def test_per_step_plateau_with_noise(seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps = np.arange(10_000)
    decisions = replay(steps, plateau_curve(rng, 10_000, tau=600, noise=0.15), **PER_STEP)
    assert decisions
    assert 1_500 <= decisions[0].step <= 7_000


@pytest.mark.parametrize("seed", range(5))
def test_slow_steady_decline_never_triggers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps = np.arange(10_000)
    linear = 2.0 - 1.5 * steps / 10_000 + rng.normal(0, 0.15, 10_000)
    assert replay(steps, linear, **PER_STEP) == []
    spikes = np.where(rng.random(10_000) < 0.01, 30.0, 1.0)  # heavy-tailed: 1% of points 30x noisier
    spiky = 2.0 - 1.5 * steps / 10_000 + rng.normal(0, 0.1, 10_000) * spikes
    assert replay(steps, spiky, **PER_STEP) == []
    epochs = np.arange(60)
    assert replay(epochs * 100, 2.0 - 1.5 * epochs / 60 + rng.normal(0, 0.01, 60)) == []


def staircase(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    epochs = np.arange(200)
    return epochs * 100, plateau_curve(rng, 200, tau=5.0, noise=0.005)


def test_last_stage_ends_with_stop() -> None:
    steps, loss = staircase(np.random.default_rng(0))
    decisions = replay(steps, loss, max_decays=2)
    assert [d.action for d in decisions] == ["decay", "decay", "stop"]
    assert [d.lr for d in decisions] == pytest.approx([0.01, 0.001, 0.001])
    assert decisions[-1].factor == 1.0
    assert "stop training" in decisions[-1].evidence.explanation
    assert decisions[0].step < decisions[1].step < decisions[2].step


def test_min_lr_turns_the_decay_into_a_stop() -> None:
    steps, loss = staircase(np.random.default_rng(1))
    decisions = replay(steps, loss, max_decays=10, min_lr=0.005)
    assert [d.action for d in decisions] == ["decay", "stop"]


def test_warmup_points_are_ignored() -> None:
    rng = np.random.default_rng(2)
    steps = np.arange(140) * 100
    # During LR warm-up the loss drops, stalls while the LR is still tiny, then the real first stage begins.
    warm = np.concatenate([2.3 - 0.8 * (1 - np.exp(-np.arange(15) / 3.0)), np.full(25, 1.5)])
    loss = np.concatenate([warm, 0.3 + 1.2 * np.exp(-np.arange(100) / 6.0)]) + rng.normal(0, 0.005, 140)
    assert replay(steps, loss)[0].step < 40 * 100  # the stall looks like a stage end...
    decisions = replay(steps, loss, warmup=40)
    assert decisions
    assert decisions[0].step > 60 * 100  # ...unless warm-up points are ignored


def test_accuracy_in_max_mode() -> None:
    rng = np.random.default_rng(3)
    epochs = np.arange(80)
    accuracy = 0.9 - 0.8 * np.exp(-epochs / 6.0) + rng.normal(0, 0.003, 80)
    decisions = replay(epochs * 100, accuracy, mode="max")
    assert decisions and decisions[0].step > 15 * 100
    assert replay(epochs * 100, -accuracy, mode="max") == []  # a falling accuracy has no plateau to find


def test_non_finite_values_are_skipped() -> None:
    rng = np.random.default_rng(4)
    epochs = np.arange(80)
    loss = plateau_curve(rng, 80, 6.0, 0.01)
    with_nan = loss.copy()
    with_nan[[5, 50]] = np.nan
    assert [d.step for d in replay(epochs * 100, with_nan)] != []
