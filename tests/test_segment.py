"""Stage segmentation of recorded curves (``server.detectors.segment``), on synthetic runs with known stages."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from server.detectors.segment import Stage, segment

N = 3000
DROPS = (1000, 2000)  # indices of the first points of stages 2 and 3
STEP = 10  # steps between logged points
TOLERANCE = 25  # points


def step_decay_curve(seed: int, *, noise: str = "gauss", drops: tuple[int, int] = DROPS) -> np.ndarray:
    """A StepDecay-like loss: three stages, each a slowing decline; after each decay the loss settles to a
    lower level over ~15 points; the second drop is only 4 noise standard deviations."""
    rng = np.random.default_rng(seed)
    y = np.empty(N)
    bounds = [0, *drops, N]
    levels = [(2.0, 1.0), (0.55, 0.45), (0.25, 0.22)]
    for k, (hi, lo) in enumerate(levels):
        a, b = bounds[k], bounds[k + 1]
        s = np.arange(b - a)
        base = lo + (hi - lo) * np.exp(-s / (300 if k == 0 else 200))
        if k:
            base += (y[a - 1] - hi) * np.exp(-s / 15)  # starts where the last stage ended, then drops
        y[a:b] = base
    if noise == "gauss":
        return y + 0.05 * rng.standard_normal(N)
    return y + 0.03 * rng.standard_t(1.5, size=N)


def steps_of(n: int = N) -> list[int]:
    return [STEP * i for i in range(n)]


def starts(stages: list[Stage]) -> list[int]:
    return [s.start_step // STEP for s in stages]


def assert_covers(stages: list[Stage], steps: list[int]) -> None:
    """Stages are numbered in order and cover every point exactly once."""
    assert [s.index for s in stages] == list(range(len(stages)))
    assert stages[0].start_step == steps[0] and stages[-1].end_step == steps[-1]
    position = {step: i for i, step in enumerate(steps)}
    for before, after in itertools.pairwise(stages):
        assert position[after.start_step] == position[before.end_step] + 1
    assert sum(int(s.summary["points"] or 0) for s in stages) == len(steps)


@pytest.mark.parametrize("noise", ["gauss", "heavy"])
@pytest.mark.parametrize("seed", range(4))
def test_step_decay_drops_are_found_and_nothing_else(seed: int, noise: str) -> None:
    steps = steps_of()
    stages = segment(steps, step_decay_curve(seed, noise=noise).tolist())
    assert len(stages) == 3, starts(stages)
    for found, true in zip(starts(stages)[1:], DROPS, strict=True):
        assert abs(found - true) <= TOLERANCE
    assert [s.source for s in stages] == ["curve"] * 3
    assert all(s.lr is None for s in stages)
    gaps = [s.summary["gap"] for s in stages[1:]]
    assert all(g is not None and g < -0.1 for g in gaps), gaps
    assert_covers(stages, steps)


def test_drops_only_direction_ignores_rises() -> None:
    y = step_decay_curve(0)
    accuracy = (1.0 - y / 3).tolist()  # the same stages, rising
    steps = steps_of()
    assert len(segment(steps, accuracy, direction="decrease")) == 1
    assert len(segment(steps, accuracy, direction="increase")) == 3
    assert len(segment(steps, accuracy)) == 3
    assert len(segment(steps, y.tolist(), direction="increase")) == 1


SMOOTH = {
    "exponential": lambda t: 0.2 + 2.0 * np.exp(-t / 200),
    "fast-exponential": lambda t: 0.2 + 2.0 * np.exp(-t / 40),
    "power-law": lambda t: 3.0 * (1.0 + t) ** -0.5,
    "linear": lambda t: 2.0 - t / 2000,
}


def smooth_noise(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "gauss":
        return 0.05 * rng.standard_normal(N)
    if kind == "heavy":
        return 0.03 * rng.standard_t(1.5, size=N)
    # AR(1), coefficient 0.7: slow wiggles that medians of neighbouring windows don't average out
    e = rng.standard_normal(N)
    out = np.zeros(N)
    for i in range(1, N):
        out[i] = 0.7 * out[i - 1] + e[i]
    return 0.03 * out


@pytest.mark.parametrize("noise", ["gauss", "heavy", "correlated"])
@pytest.mark.parametrize("shape", sorted(SMOOTH))
def test_smooth_noisy_decline_is_one_stage(shape: str, noise: str) -> None:
    t = np.arange(N, dtype=np.float64)
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        eps = smooth_noise(rng, noise)
        stages = segment(steps_of(), (SMOOTH[shape](t) + eps).tolist())
        assert len(stages) == 1, (seed, starts(stages))
        assert stages[0].summary["points"] == N


def test_heavy_tailed_spikes_and_bursts_do_not_create_stages() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(N, dtype=np.float64)
    y = 0.3 + np.exp(-t / 500) + 0.02 * rng.standard_normal(N)
    y[rng.choice(N, size=60, replace=False)] += rng.choice([-1.0, 1.0], size=60) * rng.uniform(1, 20, size=60)
    y[1500:1512] += 3.0  # a burst of 12 points (a bad batch streak)
    y[2200:2206] = math.nan  # NaNs belong to their stage, ignored by the test
    y[2300] = math.inf
    stages = segment(steps_of(), y.tolist())
    assert len(stages) == 1, starts(stages)
    assert stages[0].summary["nonfinite"] == 7
    assert stages[0].summary["max"] is not None and stages[0].summary["max"] > 3


def test_a_real_drop_among_spikes_is_still_found() -> None:
    rng = np.random.default_rng(8)
    t = np.arange(N, dtype=np.float64)
    y = 0.3 + np.exp(-t / 500) + 0.02 * rng.standard_normal(N)
    y[rng.choice(N, size=60, replace=False)] += rng.uniform(1, 20, size=60)
    y[1700:] -= 0.2
    assert starts(segment(steps_of(), y.tolist())) == [0, pytest.approx(1700, abs=TOLERANCE)]


def lr_schedule(changes: tuple[int, ...], levels: tuple[float, ...]) -> list[float | None]:
    lr = np.full(N, levels[0])
    for index, level in zip(changes, levels[1:], strict=True):
        lr[index:] = level
    return lr.tolist()


def test_lr_changes_give_stages_and_merge_with_nearby_curve_drops() -> None:
    steps = steps_of()
    y = step_decay_curve(1, drops=(1004, 1994))  # the curve drops a few points off the logged LR change
    lrs = lr_schedule(DROPS, (0.1, 0.01, 0.001))
    stages = segment(steps, y.tolist(), lrs)
    assert starts(stages) == [0, *DROPS]  # placed exactly at the LR change, no extra curve stage
    assert [s.source for s in stages] == ["lr_change"] * 3
    assert [s.lr for s in stages] == [0.1, 0.01, 0.001]
    assert all(s.summary["gap"] is not None for s in stages[1:])  # the curve's drop, merged in
    assert_covers(stages, steps)


def test_lr_changes_without_drops_still_give_stages() -> None:
    t = np.arange(N, dtype=np.float64)
    y = (SMOOTH["exponential"](t) + 0.05 * np.random.default_rng(3).standard_normal(N)).tolist()
    lrs = lr_schedule((1200,), (0.1, 0.05))
    lrs[:5] = [None] * 5  # not logged yet: the first known LR applies
    lrs[2000] = math.nan  # a missing value carries the previous one
    stages = segment(steps_of(), y, lrs)
    assert starts(stages) == [0, 1200]
    assert [s.lr for s in stages] == [0.1, 0.05]
    assert [s.summary["gap"] for s in stages] == [None, None]


def test_curve_drop_far_from_any_lr_change_is_its_own_stage() -> None:
    y = step_decay_curve(2)
    lrs = lr_schedule((1000,), (0.1, 0.01))  # the second decay was not logged
    stages = segment(steps_of(), y.tolist(), lrs)
    assert starts(stages)[:2] == [0, 1000]
    assert len(stages) == 3 and abs(starts(stages)[2] - 2000) <= TOLERANCE
    assert [s.source for s in stages] == ["lr_change", "lr_change", "curve"]
    assert [s.lr for s in stages] == [0.1, 0.01, 0.01]


def test_warm_up_and_per_step_schedules_give_no_lr_stage() -> None:
    t = np.arange(N, dtype=np.float64)
    y = (SMOOTH["power-law"](t) + 0.05 * np.random.default_rng(4).standard_normal(N)).tolist()
    warm_up = [0.1 * min(1.0, (i + 1) / 100) for i in range(N)]
    stages = segment(steps_of(), y, warm_up)
    assert len(stages) == 1 and stages[0].lr == 0.1
    cosine = [0.05 * (1 + math.cos(math.pi * i / N)) for i in range(N)]
    assert len(segment(steps_of(), y, cosine)) == 1
    # A warm-up before a StepDecay: the ramp joins the first stage, the decay starts the second.
    step_decay = [0.1 * min(1.0, (i + 1) / 100) if i < 1500 else 0.01 for i in range(N)]
    stages = segment(steps_of(), y, step_decay)
    assert starts(stages) == [0, 1500] and [s.lr for s in stages] == [0.1, 0.01]


def test_min_stage_and_short_runs() -> None:
    y = step_decay_curve(0)
    assert len(segment(steps_of(), y.tolist(), min_stage=800)) == 3
    assert len(segment(steps_of(), y.tolist(), min_stage=1100)) == 1  # stages of 1000 points are too short
    assert segment([], []) == []
    short = segment([0, 1, 2], [1.0, 0.5, 0.1])
    assert len(short) == 1 and short[0].summary == {
        "points": 3,
        "nonfinite": 0,
        "first": 1.0,
        "last": 0.1,
        "min": 0.1,
        "max": 1.0,
        "mean": pytest.approx(1.6 / 3),
        "median": 0.5,
        "gap": None,
        "gap_score": None,
    }


def test_per_epoch_run() -> None:
    """90 points (one per epoch), decays at epochs 30 and 60: the automatic windows shrink to fit."""
    e = np.arange(90, dtype=np.float64)
    y = np.where(e < 30, 1.0 + np.exp(-e / 8), np.where(e < 60, 0.5 + 0.05 * np.exp(-(e - 30) / 10), 0.3))
    y += 0.02 * np.random.default_rng(5).standard_normal(90)
    assert starts(segment([10 * int(i) for i in e], y.tolist())) == [0, 30, 60]


def test_long_run_is_segmented() -> None:
    n = 400_000
    rng = np.random.default_rng(6)
    y = 0.5 + np.exp(-np.arange(n) / 40_000) + 0.05 * rng.standard_normal(n)
    y[250_000:] -= 0.3
    stages = segment(list(range(n)), y.tolist())
    assert [s.start_step for s in stages] == [0, pytest.approx(250_000, abs=200)]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="strictly increase"):
        segment([0, 2, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="differ in length"):
        segment([0, 1], [1.0])
    with pytest.raises(ValueError, match="differ in length"):
        segment([0, 1], [1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="min_stage"):
        segment([0, 1], [1.0, 2.0], min_stage=1)
