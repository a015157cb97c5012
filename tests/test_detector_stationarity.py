"""SASA+: the leaky bucket and the test follow statopt; on simulated SGD the drops come when and only when due."""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from server.detectors import make_detector
from server.detectors.base import Decision
from server.detectors.stationarity import LeakyBucket, Stationarity


def detector(**params: object) -> Stationarity:
    d = make_detector("stationarity", params)
    assert isinstance(d, Stationarity)
    return d


def simulate_qhm(
    d: Stationarity, steps: int, *, alpha: float, beta: float = 0.9, seed: int = 0, dim: int = 20
) -> list[Decision]:
    """SGD with dampened momentum (statopt QHM, nu = 1) on a noisy quadratic 0.5 x'Ax, weight decay 1e-3.

    The worker side, exactly as the module docstring says: g <- grad + wd x; h <- (1 - beta) g + beta h;
    d = h; x <- x - alpha d; Delta = <x_{k+1}, d> + alpha/2 ||d||^2. A decision is applied at once (new LR,
    momentum zeroed, as statopt does)."""
    rng = np.random.default_rng(seed)
    curvature = np.linspace(0.1, 1.0, dim)
    wd = 1e-3
    x = rng.normal(0, 3, dim)
    h = np.zeros(dim)
    decisions: list[Decision] = []
    for k in range(steps):
        g = curvature * x + rng.normal(0, 1, dim) + wd * x
        h = (1 - beta) * g + beta * h
        x = x - alpha * h
        delta = float(x @ h + 0.5 * alpha * (h @ h))
        for decision in d.update(k, delta):
            decisions.append(decision)
            if decision.action == "decay":
                alpha = alpha * decision.factor
                h[:] = 0.0
    return decisions


def test_sgd_on_a_noisy_quadratic_drops_when_stationary_and_not_before() -> None:
    d = detector(initial_lr=0.5)
    decisions = simulate_qhm(d, 40_000, alpha=0.5)
    steps = [x.step for x in decisions]
    assert len(decisions) >= 3
    assert all(x.action == "decay" and x.factor == 0.1 for x in decisions)
    expected_lr, lrs = 0.5, []
    for _ in decisions:
        expected_lr /= 10  # statopt: lr /= drop_factor
        lrs.append(expected_lr)
    assert [x.lr for x in decisions] == lrs
    # never earlier than the bucket allows: more than min_samples kept values = more than 1000 * 8 points
    floor = 1000 * 8
    assert steps[0] + 1 > max(1000, floor)  # after warmup and after the first full bucket
    assert all(b - a > floor for a, b in itertools.pairwise(steps))
    # tests happen on every 100th point (n_steps = step + 1 here)
    assert all((s + 1) % 100 == 0 for s in steps)
    first, second = decisions[0].evidence, decisions[1].evidence
    assert first.statistic == "mean of Delta" and first.threshold == 0.0
    # the first drop uses the composite test: zero within a half-width of both half-means
    assert first.details["test"] == "composite"
    hw, m1, m2 = (first.details[k] for k in ("half_width", "mean_first_half", "mean_second_half"))
    assert isinstance(hw, float) and isinstance(m1, float) and isinstance(m2, float)
    assert abs(m1) < hw and abs(m2) < hw and m1 * m2 > 0
    # later ones the plain one: zero inside the interval of the mean
    assert second.details["test"] == "confidence interval"
    lower, upper = second.details["lower"], second.details["upper"]
    assert isinstance(lower, float) and isinstance(upper, float) and lower < 0 < upper
    # the window is the bucket: the newest ceil(n / 8) points before the test
    assert first.window[1] == steps[0] and first.window[1] - first.window[0] + 1 == first.details["kept"]
    assert first.details["kept"] == math.ceil((steps[0] + 1) / 8)


def test_no_drop_before_warmup() -> None:
    d = detector(initial_lr=0.5, warmup=20_000)
    decisions = simulate_qhm(d, 24_000, alpha=0.5)
    assert decisions, "stationary long before the end of warmup: the first test after it must fire"
    assert 20_000 < decisions[0].step + 1 <= 20_000 + 300


def test_strongly_non_stationary_delta_never_triggers() -> None:
    rng = np.random.default_rng(7)
    d = detector(warmup=0, min_samples=100, leak_ratio=2)
    values = 5.0 + rng.normal(0, 1, 50_000)
    assert [x for i, v in enumerate(values.tolist()) for x in d.update(i, v)] == []
    # a steadily moving iterate: Delta drifts, half-means differ, the interval misses zero
    d = detector(warmup=0, min_samples=100, leak_ratio=2)
    drifting = np.linspace(-3.0, 3.0, 50_000) + rng.normal(0, 0.1, 50_000)
    assert [x for i, v in enumerate(drifting.tolist()) for x in d.update(i, v)] == []


def test_min_lr_turns_the_drop_into_a_stop() -> None:
    d = detector(initial_lr=0.5, min_lr=1e-3)
    decisions = simulate_qhm(d, 40_000, alpha=0.5)
    assert [x.action for x in decisions] == ["decay", "decay", "stop"]  # 0.05, 0.005, then 5e-4 < 1e-3
    assert decisions[-1].lr == 0.5 / 10 / 10 and decisions[-1].factor == 1.0


def test_non_finite_delta_counts_as_a_step_but_is_not_stored() -> None:
    d = detector()
    d.update(0, 1.0)
    d.update(1, math.nan)
    d.update(2, 2.0)
    state = d.state_dict()
    assert state["n_steps"] == 3 and state["bucket"]["values"] == [2.0]  # ratio 8: the newest 1 of 2 kept
    assert state["bucket"]["total_count"] == 2


@settings(max_examples=100, deadline=None)
@given(ratio=st.integers(1, 9), n=st.integers(0, 400), size=st.integers(1, 20))
def test_leaky_bucket_keeps_the_newest_ceil_n_over_ratio(ratio: int, n: int, size: int) -> None:
    bucket = LeakyBucket(ratio, size=size)  # tiny buffers: exercise doubling and shifting
    for i in range(n):
        bucket.add(100 + i, float(i))
        kept = math.ceil((i + 1) / ratio)
        assert bucket.count == kept == bucket.end - bucket.start
        assert bucket.kept().tolist() == [float(j) for j in range(i + 1 - kept, i + 1)]
        assert bucket.kept_steps().tolist() == list(range(100 + i + 1 - kept, 100 + i + 1))
    bucket.reset()
    assert bucket.count == bucket.total_count == 0


@pytest.mark.parametrize("count", [100, 101, 1013, 2500])
def test_variance_estimators_match_their_definitions(count: int) -> None:
    rng = np.random.default_rng(count)
    values = np.cumsum(rng.normal(0, 1, count)) * 0.01 + rng.normal(0, 1, count)  # autocorrelated
    bucket = LeakyBucket(1)
    for i, v in enumerate(values.tolist()):
        bucket.add(i, v)
    y = values.tolist()
    mean = statistics.fmean(y)
    b = math.floor(math.sqrt(count))
    # batch means: non-overlapping batches of b, the rest dropped
    batches = [statistics.fmean(y[i * b : (i + 1) * b]) for i in range(count // b)]
    bm = math.sqrt(b / (len(batches) - 1)) * math.sqrt(sum((m - mean) ** 2 for m in batches))
    got = bucket.mean_std("bm")
    assert got[2:] == (b - 1, b)
    assert math.isclose(got[0], mean, rel_tol=1e-12, abs_tol=1e-12) and math.isclose(got[1], bm, rel_tol=1e-9)
    # overlapping batch means: every window of b
    windows = [statistics.fmean(y[i : i + b]) for i in range(count - b + 1)]
    nw = len(windows)
    olbm = math.sqrt(b * count / (nw * (nw - 1))) * math.sqrt(sum((m - mean) ** 2 for m in windows))
    got = bucket.mean_std("olbm")
    assert got[2] == count - b and math.isclose(got[1], olbm, rel_tol=1e-9)
    # iid
    got = bucket.mean_std("iid")
    assert got[2] == count - 1 and math.isclose(got[1], statistics.stdev(y), rel_tol=1e-9)
    # the test itself: a t-interval from scipy.stats.t.ppf, half-means split at floor(count / 2)
    result = bucket.stats_test(0.05, "bm", composite=False)
    t = scipy.stats.t.ppf(1 - 0.05 / 2, b - 1)
    assert math.isclose(result.half_width, bm * t / math.sqrt(count), rel_tol=1e-9)
    m1, m2 = statistics.fmean(y[: count // 2]), statistics.fmean(y[count // 2 :])
    assert math.isclose(result.mean1, m1, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(result.mean2, m2, rel_tol=1e-9, abs_tol=1e-12)
    lower, upper = mean - result.half_width, mean + result.half_width
    assert result.stationary == ((lower < 0 < upper) and m1 * m2 > 0)
    composite = bucket.stats_test(0.05, "bm", composite=True)
    hw = composite.half_width
    assert composite.stationary == ((m1 - hw) * (m1 + hw) < 0 and (m2 - hw) * (m2 + hw) < 0 and m1 * m2 > 0)


def test_zero_mean_noise_is_stationary_and_the_composite_test_is_stricter() -> None:
    rng = np.random.default_rng(8)
    # zero mean noise: the plain interval test passes about half the time (half-means of one sign)
    decisions: list[Decision] = []
    d = detector(warmup=0, min_samples=100, leak_ratio=1, test_every=10)
    for i, v in enumerate(rng.normal(0, 1, 20_000).tolist()):
        decisions += d.update(i, v)
    assert len(decisions) >= 10
    # half-means 0.15 and 0.01 (each half's noise centred exactly), interval half-width about 0.1: the whole
    # mean's interval holds zero, the first half-mean's does not, so only the plain test passes
    noise = rng.normal(0, 1, 400)
    noise[:200] -= noise[:200].mean()
    noise[200:] -= noise[200:].mean()
    values = noise + np.r_[np.full(200, 0.15), np.full(200, 0.01)]
    bucket = LeakyBucket(1)
    for i, v in enumerate(values.tolist()):
        bucket.add(i, v)
    plain = bucket.stats_test(0.05, "bm", composite=False)
    composite = bucket.stats_test(0.05, "bm", composite=True)
    assert plain.mean - plain.half_width < 0 < plain.mean1 - plain.half_width  # the construction holds
    assert plain.stationary
    assert not composite.stationary


def docstring_snippet() -> str:
    """The torch code of the module docstring that a worker copies to compute Delta."""
    import textwrap

    import server.detectors.stationarity as module

    doc = module.__doc__ or ""
    block = doc.split("Right after ``optimizer.step()``::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


@pytest.mark.parametrize(
    ("momentum", "dampening", "weight_decay"), [(0.9, 0.0, 5e-4), (0.9, 0.9, 0.0), (0.0, 0.0, 1e-2), (0.0, 0.0, 0.0)]
)
def test_docstring_snippet_computes_delta_for_torch_sgd(momentum: float, dampening: float, weight_decay: float) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    code = compile(docstring_snippet(), "stationarity docstring", "exec")
    for _ in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        model(torch.randn(16, 5, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
        namespace: dict[str, Any] = {"torch": torch, "optimizer": optimizer, "device": "cpu"}
        exec(code, namespace)
        alpha = 0.05
        # the definition: d_k = (x_k - x_{k+1}) / alpha, Delta = <x_{k+1}, d_k> + alpha / 2 ||d_k||^2
        expected = 0.0
        for p, x_k in zip(model.parameters(), before, strict=True):
            d = (x_k - p.detach()) / alpha
            expected += float(
                torch.dot(p.detach().flatten(), d.flatten()) + 0.5 * alpha * torch.dot(d.flatten(), d.flatten())
            )
        assert math.isclose(float(namespace["delta"]), expected, rel_tol=1e-8, abs_tol=1e-10)
