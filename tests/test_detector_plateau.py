"""The plateau detector is PyTorch's ReduceLROnPlateau: same steps of LR change, same LRs, bit for bit.

The oracle is the real ``torch.optim.lr_scheduler.ReduceLROnPlateau`` on an SGD optimizer over one dummy
parameter. Both sides compute ``max(lr * factor, min_lr)`` with the same Python float operations, so LRs are
compared with ``==`` (no tolerance).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.detectors import make_detector
from server.detectors.base import Decision
from server.detectors.plateau import Plateau

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 0.5, 1e-9, -1e-9]


@st.composite
def curves(draw: st.DrawFn) -> list[float]:
    """A loss-like curve: stages that fall and then sit on a plateau, with repeats, noise and specials."""
    level = draw(st.floats(-5, 5, allow_nan=False))
    out: list[float] = []
    for _ in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(0, 15))):  # falling
            level -= draw(st.floats(0, 0.5, allow_nan=False))
            out.append(level)
        plateau = draw(st.integers(0, 25))
        noise = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1]))
        for _ in range(plateau):  # flat, possibly noisy, sometimes a special value
            if draw(st.integers(0, 19)) == 0:
                out.append(draw(st.sampled_from(SPECIAL)))
            else:
                out.append(level + noise * draw(st.floats(-1, 1, allow_nan=False)))
    return out


values_strategy = st.one_of(
    curves(),
    st.lists(
        st.one_of(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), st.sampled_from(SPECIAL)),
        min_size=1,
        max_size=80,
    ),
    st.lists(st.sampled_from([1.0, 2.0, 3.0, math.nan]), min_size=1, max_size=60),  # many exact repeats
)

params_strategy = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["min", "max"]),
        "factor": st.one_of(st.sampled_from([0.1, 0.5, 0.3]), st.floats(0.01, 0.99)),
        "patience": st.integers(0, 6),
        "threshold": st.sampled_from([0.0, 1e-4, 1e-2, 0.1, 0.5]),
        "threshold_mode": st.sampled_from(["rel", "abs"]),
        "cooldown": st.integers(0, 4),
        "min_lr": st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05]),
        "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
        "initial_lr": st.sampled_from([None, 0.1, 1.0, 0.3, 2.5, 1e-7]),
    }
)


def torch_lr_changes(values: list[float], params: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(index, old lr, new lr) of every LR change made by the real scheduler."""
    lr = params["initial_lr"] if params["initial_lr"] is not None else 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    kwargs = {k: v for k, v in params.items() if k != "initial_lr"}
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    changes = []
    for i, value in enumerate(values):
        before = optimizer.param_groups[0]["lr"]
        scheduler.step(value)
        after = optimizer.param_groups[0]["lr"]
        if after != before:
            changes.append((i, before, after))
    return changes


def run(values: list[float], params: dict[str, Any], first_step: int = 0) -> tuple[Plateau, list[Decision]]:
    detector = make_detector("plateau", params)
    assert isinstance(detector, Plateau)
    decisions = [d for i, v in enumerate(values) for d in detector.update(first_step + i, v)]
    return detector, decisions


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=values_strategy, params=params_strategy)
def test_same_lr_changes_as_torch(values: list[float], params: dict[str, Any]) -> None:
    expected = torch_lr_changes(values, params)
    detector, decisions = run(values, params, first_step=7)
    assert [d.step - 7 for d in decisions] == [i for i, _, _ in expected]
    for decision, (_, old, new) in zip(decisions, expected, strict=True):
        assert decision.action == "decay"
        assert decision.factor == new / old  # exact: the clamp at min_lr shows in the factor
        if params["initial_lr"] is None:
            assert decision.lr is None
        else:
            assert decision.lr == new
        assert decision.evidence.value > params["patience"]
        assert decision.evidence.threshold == params["patience"]
    final = expected[-1][2] if expected else (params["initial_lr"] or 1.0)
    if params["initial_lr"] is None:
        assert detector.lr is None
        assert detector.relative_lr == final
    else:
        assert detector.lr == final


def test_defaults_are_torchs() -> None:
    import inspect

    signature = inspect.signature(torch.optim.lr_scheduler.ReduceLROnPlateau.__init__)
    detector = make_detector("plateau")
    for name in ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps"):
        assert getattr(detector.params, name) == signature.parameters[name].default, name


def test_fires_on_the_patience_plus_first_bad_point_with_evidence() -> None:
    values = [1.0, 0.5, 0.4123] + [0.4123] * 11  # 11 points without improvement, patience 10
    _, decisions = run(values, {"initial_lr": 0.1}, first_step=100)
    assert len(decisions) == 1
    d = decisions[0]
    assert d.step == 113 and d.lr == 0.1 * 0.1
    assert d.factor == (0.1 * 0.1) / 0.1  # new_lr / old_lr exactly (0.10000000000000002)
    assert d.evidence.window == (102, 113)  # from the point that set the best to now
    assert d.evidence.statistic == "epochs without improvement"
    assert d.evidence.value == 11 and d.evidence.threshold == 10
    assert "0.4123" in d.evidence.explanation and "patience of 10" in d.evidence.explanation
    assert d.evidence.details["best"] == 0.4123


def test_min_lr_clamp_shows_in_factor_then_stops_changing() -> None:
    params = {"initial_lr": 0.1, "factor": 0.1, "min_lr": 0.05, "patience": 0}
    values = [1.0] + [2.0] * 6
    _, decisions = run(values, params)
    expected = torch_lr_changes(values, params)
    assert [(d.step, d.lr) for d in decisions] == [(i, new) for i, _, new in expected] == [(1, 0.05)]
    assert decisions[0].factor == 0.05 / 0.1  # 0.5, not 0.1: the clamp


def test_eps_suppresses_negligible_reductions_like_torch() -> None:
    params = {"initial_lr": 1e-8, "factor": 0.5, "patience": 0, "eps": 1e-8}
    values = [1.0] + [2.0] * 5
    assert torch_lr_changes(values, params) == []
    assert run(values, params)[1] == []
    params["eps"] = 1e-9  # 1e-8 -> 5e-9 -> 2.5e-9 -> 1.25e-9 change; the next step (6.25e-10) is below eps
    assert [(d.step, d.lr) for d in run(values, params)[1]] == [
        (i, new) for i, _, new in torch_lr_changes(values, params)
    ]
    assert [d.lr for d in run(values, params)[1]] == [5e-9, 2.5e-9, 1.25e-9]


def test_nan_counts_as_bad_like_torch() -> None:
    params = {"initial_lr": 1.0, "patience": 2}
    values = [1.0, math.nan, math.nan, math.nan, 0.5]
    _, decisions = run(values, params)
    assert [d.step for d in decisions] == [i for i, _, _ in torch_lr_changes(values, params)] == [3]


def test_unknown_lr_is_relative_and_set_lr_makes_it_known() -> None:
    detector = make_detector("plateau", {"patience": 0})
    assert detector.update(0, 1.0) == []
    (first,) = detector.update(1, 2.0)
    assert first.lr is None and first.factor == 0.1
    detector.set_lr(0.2)
    (second,) = detector.update(2, 2.0)
    assert second.lr == 0.2 * 0.1 and detector.lr == second.lr
