"""AutoDecay on curves with a known plateau onset, steady declines that must not trigger, zig-zagging stages that
must not leave it silent, stops that follow the evidence rather than a floor, collapses told apart from stage
ends, and its limits."""

from __future__ import annotations

import json

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
    # A metric that only gets worse has no improving stage to wait for: the stage ends at its first test (it is
    # not a divergence either: it never improved on where it started).
    falling = replay(epochs * 100, -accuracy, mode="max")
    assert falling and falling[0].action == "decay" and falling[0].step <= 8 * 100
    assert falling[0].evidence.value == 0.0
    assert "diverged" not in falling[0].evidence.explanation


def test_isolated_non_finite_values_are_skipped() -> None:
    rng = np.random.default_rng(4)
    epochs = np.arange(80)
    loss = plateau_curve(rng, 80, 6.0, 0.01)
    with_nan = loss.copy()
    with_nan[[5, 50]] = [np.nan, np.inf]  # one at a time: an epoch mean with one overflowed batch, say
    decisions = replay(epochs * 100, with_nan)
    assert decisions and decisions[0].action == "decay"
    assert all("diverged" not in d.evidence.explanation for d in decisions)


# --- stages that zig-zag, slow climbs, and stops that follow the evidence ------------------------------------------

# Test accuracy per epoch of the MNIST-1D recipe at a constant LR 0.1 (`stagewatch train --recipe mnist1d-cnn
# --lr 0.1 --seed 0`, the setting the recipe used before): it zig-zags between 29 % and 86 % and its average
# hardly moves after epoch 10. The old rule found "no pace" on such stages and said nothing for 60 epochs.
ZIGZAG_LR01 = [
    0.432, 0.448, 0.665, 0.72, 0.75, 0.294, 0.666, 0.748, 0.68, 0.71, 0.82, 0.85, 0.67, 0.68, 0.78, 0.73, 0.82,
    0.75, 0.79, 0.81, 0.77, 0.83, 0.76, 0.82, 0.68, 0.75, 0.78, 0.72, 0.69, 0.66, 0.81, 0.86, 0.75, 0.74, 0.68,
    0.82, 0.79, 0.81, 0.81, 0.83, 0.77, 0.79, 0.69, 0.84, 0.78, 0.81, 0.82, 0.67, 0.82, 0.63, 0.75, 0.76, 0.82,
    0.80, 0.81, 0.80, 0.79, 0.79, 0.85, 0.82,
]  # fmt: skip


def test_a_zigzagging_stage_gets_a_decision_not_silence() -> None:
    epochs = np.arange(1, len(ZIGZAG_LR01) + 1)
    decisions = replay(epochs * 125, np.array(ZIGZAG_LR01), mode="max", chance=0.1)
    assert decisions, "a stage that zig-zags without improving must end"
    first = decisions[0]
    assert first.action == "decay"
    assert first.step <= 15 * 125  # its best 3-epoch mean stopped moving by epoch ~8
    assert first.evidence.value <= first.evidence.threshold
    assert first.evidence.details["rule"] == "best"
    # The zig-zag's dip to 29 % is not a collapse: it gave back far less than 90 % of the gain on chance.
    assert all("diverged" not in d.evidence.explanation for d in decisions)


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_zigzag_plateau_ends_soon_after_its_onset(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    epochs = np.arange(60)
    level = 0.8 - 0.6 * np.exp(-epochs / 2.0)  # learned in ~6 epochs, then only noise
    accuracy = np.clip(level + rng.normal(0, 0.08, 60), 0.0, 1.0)
    decisions = replay(epochs * 100, accuracy, mode="max", chance=0.1)
    assert decisions and decisions[0].action == "decay"
    assert 5 * 100 <= decisions[0].step <= 25 * 100


@pytest.mark.parametrize("seed", range(5))
def test_a_slow_climb_above_the_noise_keeps_the_stage_going(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    epochs = np.arange(45)
    accuracy = 0.80 + 0.004 * epochs + rng.normal(0, 0.003, 45)  # +0.4 points an epoch, noise 0.3 points
    assert replay(epochs * 100, accuracy, mode="max", chance=0.1) == []


def two_stage_accuracy(rng: np.random.Generator, decay_at: int, settle: float, n: int = 60) -> np.ndarray:
    """Accuracy of a run decayed after epoch ``decay_at``: a noisy first plateau at 0.85, then a climb to 0.95
    with time constant ``settle`` epochs, low noise."""
    t = np.arange(n)
    first = 0.85 - 0.75 * np.exp(-t / 2.0) + rng.normal(0, 0.02, n)
    after = 0.95 - 0.08 * np.exp(-(t - decay_at) / settle) + rng.normal(0, 0.002, n)
    return np.where(t <= decay_at, first, after)


def run_closed_loop(accuracy_at: object, max_epochs: int = 60, **params: object) -> list[tuple[int, str]]:
    """Feeds a detector a curve that depends on when it decayed: ``accuracy_at(epoch, decay_epoch)``."""
    detector = make_detector("autodecay", {"initial_lr": 0.1, "mode": "max", "chance": 0.1, **params})
    made: list[tuple[int, str]] = []
    decayed: int | None = None
    for epoch in range(1, max_epochs + 1):
        value = accuracy_at(epoch, decayed)  # type: ignore[operator]
        for d in detector.update(epoch * 100, value):
            made.append((epoch, d.action))
            if d.action == "decay":
                decayed = epoch
            else:
                return made
    return made


@pytest.mark.parametrize("seed", range(3))
def test_the_stop_follows_the_evidence_not_a_floor(seed: int) -> None:
    """After the decay, a second stage that keeps climbing for longer is stopped later: the stop comes a few
    epochs after that stage's own plateau onset, whatever it is, not at a fixed distance from the decay."""
    stops = {}
    for settle in (1.0, 6.0):
        rng = np.random.default_rng(300 + seed)
        noise = (rng.normal(0, 0.02, 120), rng.normal(0, 0.002, 120))

        def accuracy_at(
            epoch: int, decayed: int | None, settle: float = settle, noise: tuple[np.ndarray, ...] = noise
        ) -> float:
            if decayed is None:
                return float(0.85 - 0.75 * np.exp(-epoch / 2.0) + noise[0][epoch])
            return float(0.95 - 0.08 * np.exp(-(epoch - decayed) / settle) + noise[1][epoch])

        made = run_closed_loop(accuracy_at, max_epochs=110, max_decays=1)
        assert [a for _, a in made] == ["decay", "stop"], made
        decay, stop = made[0][0], made[1][0]
        # The second stage's plateau onset: less than the noise (0.002) left of its 0.08 climb. The stop comes
        # once the window (30 % of the stage) holds no gain beyond noise: after the onset, within about twice it.
        onset = settle * np.log(0.08 / 0.002)
        assert decay + 0.4 * onset <= stop <= decay + 2 * onset + 10
        stops[settle] = stop - decay
    assert stops[6.0] >= stops[1.0] + 8


def test_the_last_stage_s_stop_carries_its_evidence() -> None:
    rng = np.random.default_rng(7)
    made = []
    detector = make_detector("autodecay", {"initial_lr": 0.1, "mode": "max", "chance": 0.1, "max_decays": 1})
    curve = two_stage_accuracy(rng, decay_at=20, settle=2.0)
    for epoch, value in enumerate(curve, start=1):
        made += detector.update(epoch * 100, float(value))
    assert [d.action for d in made][:2] == ["decay", "stop"]
    stop = made[1]
    assert stop.evidence.value <= stop.evidence.threshold
    assert stop.evidence.details["reason"] == "last stage ended"
    assert "It was the last stage: stop training." in stop.evidence.explanation


# --- divergence: a collapse is not the end of a stage --------------------------------------------------------------


def collapsing_loss(rng: np.random.Generator, collapse_at: int, n: int = 60) -> np.ndarray:
    """Per-epoch training loss of a 10-class problem: from ln 10 down to ~0.5, then back to ln 10 (a dead
    network) from ``collapse_at`` on."""
    t = np.arange(n)
    learned = 0.5 + 1.8 * np.exp(-t / 3.0) + rng.normal(0, 0.03, n)
    dead = np.log(10) + rng.normal(0, 0.002, n)
    return np.where(t < collapse_at, learned, dead)


@pytest.mark.parametrize("chance", [float(np.log(10)), None])
def test_loss_back_to_chance_is_a_divergence_stop(chance: float | None) -> None:
    rng = np.random.default_rng(11)
    loss = collapsing_loss(rng, collapse_at=20)
    decisions = replay(np.arange(1, 61) * 100, loss, chance=chance)
    assert decisions, "a collapse must not be met with silence"
    last = decisions[-1]
    assert last.action == "stop" and last.factor == 1.0
    assert 21 * 100 <= last.step <= 23 * 100  # the second epoch back at chance (diverge_points=2)
    ev = last.evidence
    assert ev.explanation.startswith("Training diverged")
    assert ev.statistic == "share of the improvement on chance given back"
    assert ev.value >= ev.threshold == 0.9
    assert ev.details["reason"] == "diverged" and ev.details["rule"] == "back to chance"
    assert ev.details["consecutive"] == 2
    assert ev.window == (last.step - 100, last.step)
    # Nothing decays on the way to a collapse that the detector has recognised: the stop is the last decision.
    assert all(d.step < 20 * 100 for d in decisions[:-1])


def test_accuracy_falling_to_chance_is_a_divergence_stop() -> None:
    epochs = np.arange(1, 41)
    accuracy = np.where(epochs < 25, 0.9 - 0.6 * np.exp(-epochs / 3.0), 0.098)
    decisions = replay(epochs * 100, accuracy, mode="max", chance=0.1, max_decays=5)
    stop = decisions[-1]
    assert stop.action == "stop" and stop.step == 26 * 100
    assert stop.evidence.details["reason"] == "diverged"
    assert "0.098" in stop.evidence.explanation and "chance level (0.1)" in stop.evidence.explanation
    assert stop.evidence.value == pytest.approx(
        (0.9 - 0.6 * np.exp(-24 / 3.0) - 0.098) / (0.9 - 0.6 * np.exp(-8) - 0.1), rel=0.05
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metric_twice_in_a_row_is_a_divergence_stop(bad: float) -> None:
    rng = np.random.default_rng(12)
    loss = plateau_curve(rng, 30, 6.0, 0.01)
    loss[12:] = bad
    decisions = replay(np.arange(1, 31) * 100, loss)
    assert len(decisions) == 1
    stop = decisions[0]
    assert (stop.action, stop.step) == ("stop", 14 * 100)
    assert stop.evidence.statistic == "consecutive non-finite values"
    assert (stop.evidence.value, stop.evidence.threshold) == (2.0, 2.0)
    assert stop.evidence.window == (13 * 100, 14 * 100)
    assert stop.evidence.explanation.startswith("Training diverged: the monitored metric is")
    assert ("NaN" if np.isnan(bad) else "infinite") in stop.evidence.explanation
    json.dumps(stop.to_dict(), allow_nan=False)  # evidence stays strict JSON


def test_per_step_losses_diverge_on_block_medians_not_on_spikes() -> None:
    rng = np.random.default_rng(13)
    steps = np.arange(1, 6001)
    healthy = 0.4 + 1.9 * np.exp(-steps / 300) + np.abs(rng.normal(0, 0.2, 6000))
    spikes = rng.random(6000) < 0.05
    spiky = np.where(spikes, 2.5 + rng.random(6000), healthy)  # 5 % of minibatches as bad as chance, or worse
    assert all("diverged" not in d.evidence.explanation for d in replay(steps, spiky, **PER_STEP, max_decays=10))
    collapsed = np.where(steps > 4000, np.log(10) + rng.normal(0, 0.05, 6000), spiky)
    decisions = replay(steps, collapsed, **PER_STEP, max_decays=10)
    stop = decisions[-1]
    assert stop.action == "stop" and stop.evidence.details["reason"] == "diverged"
    # Three 64-point block medians back at chance (the first may straddle step 4000 with a majority after it).
    assert 4000 + 2 * 64 <= stop.step <= 4000 + 5 * 64
    assert stop.evidence.details["consecutive"] == 3


def test_a_run_that_never_learned_has_not_diverged() -> None:
    epochs = np.arange(1, 31)
    flat = np.log(10) + np.random.default_rng(14).normal(0, 0.01, 30)  # a warm-up that has not started to bite
    decisions = replay(epochs * 100, flat, chance=float(np.log(10)))
    assert all("diverged" not in d.evidence.explanation for d in decisions)


def test_divergence_state_round_trips_mid_collapse() -> None:
    rng = np.random.default_rng(15)
    loss = collapsing_loss(rng, collapse_at=20)
    whole = replay(np.arange(1, 61) * 100, loss)
    first = make_detector("autodecay", {"initial_lr": 0.1})
    cut: list[Decision] = []
    for epoch in range(1, 22):  # stop after the first epoch back at chance
        cut += first.update(epoch * 100, float(loss[epoch - 1]))
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    second = make_detector("autodecay", {"initial_lr": 0.1})
    second.load_state_dict(state)
    for epoch in range(22, 61):
        cut += second.update(epoch * 100, float(loss[epoch - 1]))
    assert [d.to_dict() for d in cut] == [d.to_dict() for d in whole]


def wandering_loss(seed: int, n: int = 8000) -> tuple[np.ndarray, np.ndarray]:
    """A per-step loss still falling (``0.3 + 2 / sqrt(1 + 3 t / n)``) under heavy noise, half of it a slow AR(1)
    wander (rho 0.98), 25 % of the level: the first block can be low by chance, and the wander high later."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = 0.3 + 2.0 / np.sqrt(1 + 3 * t / n)
    shocks = rng.normal(0, 1, n)
    ar = np.zeros(n)
    for i in range(1, n):
        ar[i] = 0.98 * ar[i - 1] + np.sqrt(1 - 0.98**2) * shocks[i]
    return t + 1, level * (1 + 0.25 * (0.7 * ar + 0.7 * rng.normal(0, 1, n)))


def test_noise_around_the_first_value_is_not_a_collapse() -> None:
    """Without a given chance level the first block is the reference; the rule arms only once the run has beaten
    it by half its magnitude, so a wander back above a lucky first block is not "diverged". With the arming
    threshold at 10 % instead, 7 of these 20 noisy but healthy runs were stopped as diverged."""
    for seed in range(20):
        steps, loss = wandering_loss(seed)
        decisions = replay(steps, loss, **PER_STEP, max_decays=10)
        assert all("diverged" not in d.evidence.explanation for d in decisions), seed
    # The same runs with the weaker arming threshold: the test can tell the two apart.
    assert any(
        "diverged" in d.evidence.explanation
        for s in range(20)
        for d in replay(*wandering_loss(s), preset="step", max_decays=10, diverge_min_gain=0.1)
    )


# --- stages after an LR change, the stage-wide noise, the window cap ---------------------------------------------

# A stage after a decay judged like the first one (the epoch preset's first-stage values).
LATER_AS_FIRST: dict[str, object] = {
    "later_smooth": 3,
    "later_min_window_blocks": 4,
    "later_min_stage": 5,
    "later_window": 0.5,
    "later_rho": 0.1,
    "later_confirm": 2,
}


def first_stage_then(after: object, seed: int) -> object:
    """``accuracy_at(epoch, decayed)``: a noisy first plateau at 0.85, then ``after(t, noise)`` ``t`` epochs
    after the decay (low noise)."""
    rng = np.random.default_rng(400 + seed)
    noise = (rng.normal(0, 0.02, 130), rng.normal(0, 0.002, 130))

    def accuracy_at(epoch: int, decayed: int | None) -> float:
        if decayed is None:
            return float(0.85 - 0.75 * np.exp(-epoch / 2.0) + noise[0][epoch])
        return float(after(epoch - decayed, noise[1][epoch]))  # type: ignore[operator]

    return accuracy_at


@pytest.mark.parametrize("seed", range(5))
def test_a_stage_after_a_decay_that_has_settled_ends_within_a_few_epochs(seed: int) -> None:
    """At a small LR the metric settles within an epoch or two and hardly zig-zags: the preset judges such a
    stage on single epochs, a 3-epoch window and one test, so the stop comes a few epochs after it settled
    (judged like the first stage -- 3-epoch means, half the stage, two tests -- it comes later)."""
    settled = first_stage_then(lambda t, e: 0.95 - 0.08 * np.exp(-t / 1.0) + e, seed)
    made = run_closed_loop(settled, max_decays=1)
    assert [a for _, a in made] == ["decay", "stop"], made
    # Settled to within its noise (0.002 of a 0.08 climb) about 4 epochs after the decay; stopped by 8.
    assert made[1][0] - made[0][0] <= 8
    slow = run_closed_loop(settled, max_decays=1, **LATER_AS_FIRST)  # type: ignore[arg-type]
    assert [a for _, a in slow] == ["decay", "stop"], slow
    assert slow[0][0] == made[0][0] and slow[1][0] >= made[1][0] + 4


@pytest.mark.parametrize("seed", range(5))
def test_a_stage_after_a_decay_still_climbing_is_not_cut_short(seed: int) -> None:
    """The faster terms of a later stage are not a floor: a second stage that climbs 0.3 points an epoch for
    15 epochs, well above its noise, goes on until the climb ends."""
    climbing = first_stage_then(lambda t, e: 0.90 + 0.003 * min(t, 15) + e / 4, seed)
    made = run_closed_loop(climbing, max_decays=1)
    assert [a for _, a in made] == ["decay", "stop"], made
    assert made[1][0] - made[0][0] >= 16  # the climb ends 15 epochs after the decay


def test_an_lr_change_from_outside_starts_a_later_stage() -> None:
    """A schedule's or a person's LR change also starts a stage judged on the later terms, and the count of
    such changes survives a restart of the detector."""
    detector = make_detector("autodecay", {"initial_lr": 0.1, "mode": "max"})
    assert detector._later(1, 3) == 3  # type: ignore[attr-defined]
    detector.set_lr(0.01)
    assert detector._later(1, 3) == 1  # type: ignore[attr-defined]
    restored = make_detector("autodecay", {"initial_lr": 0.1, "mode": "max"})
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored._later(1, 3) == 1  # type: ignore[attr-defined]


def test_an_explicit_first_stage_value_holds_for_later_stages_too() -> None:
    """The preset's later_ values were chosen against its own first-stage values: a value given explicitly
    applies to every stage unless its later_ counterpart is given as well."""
    preset = make_detector("autodecay", {"mode": "max"}).params
    assert (preset.smooth, preset.later_smooth) == (3, 1)
    explicit = make_detector("autodecay", {"mode": "max", "smooth": 2}).params
    assert explicit.later_smooth is None
    both = make_detector("autodecay", {"mode": "max", "smooth": 2, "later_smooth": 1}).params
    assert both.later_smooth == 1


@pytest.mark.parametrize("seed", range(5))
def test_a_long_zigzagging_stage_is_judged_on_a_capped_window(seed: int) -> None:
    """A first stage that climbs for 20 epochs (1.5 points an epoch, noise 3 points) and then only zig-zags
    ends about 10-15 epochs after its climb: the window is half the stage but at most 8 epochs. Uncapped, half
    of a 40-epoch stage is a 20-epoch window whose luckiest epoch keeps moving the best: it ends much later."""
    rng = np.random.default_rng(500 + seed)
    epochs = np.arange(1, 61)
    accuracy = 0.55 + 0.015 * np.minimum(epochs, 20) + rng.normal(0, 0.03, 60)
    capped = replay(epochs * 100, accuracy, mode="max", chance=0.1)
    assert capped and capped[0].action == "decay"
    assert 20 * 100 < capped[0].step <= 36 * 100
    assert capped[0].evidence.details["window_blocks"] == 8
    uncapped = replay(epochs * 100, accuracy, mode="max", chance=0.1, max_window_blocks=None)
    assert not uncapped or uncapped[0].step >= capped[0].step + 8 * 100
