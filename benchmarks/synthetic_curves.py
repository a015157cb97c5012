"""Synthetic loss curves with a known plateau onset, and negative controls that must not trigger a decay.

Every curve is deterministic (a numpy ``Generator`` seeded from the curve's index) and carries its ground
truth. Shapes and noise are calibrated on the recorded MNIST-1D runs (``benchmarks/data/curves``, LR 0.1,
batch 32): the loss falls from about 2.3 to a plateau near 0.6-0.8; per-step minibatch losses there have a
coefficient of variation (cv) of 0.52-0.57, about 40% of their variance slowly varying (lag-1/10/100
autocorrelation 0.4/0.3/0.1) and a maximum of 6-12x the median; per-epoch means have a cv of about 0.25 at that
high LR (lag-1 autocorrelation 0.4) and 0.02-0.03 once the LR is 100x smaller.

**Plateau curves** (family ``synth-step``: 6,000 points, one per step; ``synth-epoch``: 60 points, one per
epoch of 100 steps). The noiseless curve is an exponential-ish decline that reaches its floor exactly at the
onset ``T`` and stays there::

    level(t) = floor + drop * (exp(-k t/T) - exp(-k)) / (1 - exp(-k))   for t < T,   floor after   (k = 6)

``onset = T`` (the plateau starts: the curve is exactly flat from here). A decision is a *false decay* when
it comes while the noiseless curve still has more than 10% of its total drop to go (``false_before``, at
about 0.38 T): the same rule that defines the onset of the real curves, see ``bench_detection``.

**Negative controls** (``control-step``, ``control-epoch``; ``onset = None``): a slow but steady decline over
the whole curve, ``linear`` (2.3 -> 0.9) or ``invsqrt`` (``0.3 + 2 / sqrt(1 + 3 t/N)``, 2.3 -> 1.3, still
falling at a third of its average pace at the end), with Gaussian, correlated or heavy-tailed noise. Any
decision on them is a false decay.

**Noise** is multiplicative (its scale is ``cv * level(t)``, as minibatch-loss noise shrinks with the loss):

* ``gauss``: independent Gaussian;
* ``ar``: part of the variance an AR(1) process, like the slow wander of the parameters under SGD that makes
  real per-epoch means drift (per step: 40% with rho = 0.98; per epoch: 50% with rho = 0.8, as measured);
* ``t2``: Student-t with 2 degrees of freedom (infinite variance), scaled to the Gaussian's median absolute
  deviation;
* ``spikes``: Gaussian plus rare upward spikes of 10-50x the noise scale (0.5% of steps, 5% of epochs).

Values are clipped at 0.01 (a loss is positive). Run ``python -m benchmarks.synthetic_curves`` to list them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from benchmarks.harness import print_table

Kind = Literal["per-step", "per-epoch"]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

STEP_POINTS = 6000  # per-step curves: one point per optimizer step
EPOCH_POINTS = 60  # per-epoch curves: one point per epoch ...
STEPS_PER_EPOCH = 100  # ... at steps 100, 200, ..., 6000
START = 2.3  # initial loss (ln 10 for a 10-class problem)
FLOOR = 0.6  # plateau level
SHARPNESS = 6.0  # k: how sharply the decline bends into the plateau
FALSE_FRACTION = 0.10  # a decision with more than this share of the drop still to go is a false decay
LR = 0.1
CLIP = 0.01

STEP_NOISE = {"low": 0.1, "mid": 0.3, "high": 0.6}  # cv of per-step losses (real: 0.5-0.8)
EPOCH_NOISE = {"low": 0.02, "mid": 0.08, "high": 0.25}  # cv of per-epoch means (real: 0.25 at LR 0.1, 0.02 at 0.001)
ONSET_FRACTIONS = (0.25, 0.5)  # plateau onset as a share of the curve


@dataclass(frozen=True)
class Curve:
    """One series fed to a detector in order, with its ground truth.

    ``onset``: the step where the plateau starts (None for a negative control: no decision is right).
    ``false_before``: a decision before this step is a false decay (None: before ``onset``).
    ``lr``: the learning rate at the first point; ``lr_changes``: ``(step, lr)`` where a recorded schedule
    changed it (the replay tells the detector through ``set_lr``). ``signal`` names what ``values`` are:
    ``loss`` or ``sasa_delta`` (the stationarity detector's input). ``group`` labels a sub-family (noise
    type and level) for detail tables; ``steps_per_epoch`` converts steps to epochs in reports.
    """

    name: str
    family: str
    kind: Kind
    steps: IntArray
    values: FloatArray
    onset: int | None
    lr: float
    false_before: int | None = None
    lr_changes: tuple[tuple[int, float], ...] = ()
    signal: str = "loss"
    group: str = ""
    steps_per_epoch: int = 1
    info: dict[str, float | int | str | None] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """The curve's length in steps (its last step; steps start at 1 or at the first epoch's end)."""
        return int(self.steps[-1])

    @property
    def early_limit(self) -> int | None:
        return self.false_before if self.false_before is not None else self.onset


def plateau_level(t: FloatArray, onset: float, start: float = START, floor: float = FLOOR) -> FloatArray:
    """The noiseless decline-then-plateau curve at positions ``t`` (flat from ``onset`` on)."""
    u = np.clip(t / onset, 0.0, 1.0)
    k = SHARPNESS
    shape = (np.exp(-k * u) - math.exp(-k)) / (1.0 - math.exp(-k))
    return floor + (start - floor) * shape


def false_before_fraction() -> float:
    """Share of the onset at which the noiseless curve has ``FALSE_FRACTION`` of its drop left (about 0.38)."""
    k = SHARPNESS
    return -math.log(FALSE_FRACTION * (1.0 - math.exp(-k)) + math.exp(-k)) / k


def linear_level(t: FloatArray, end: float) -> FloatArray:
    return START + (0.9 - START) * (t / end)


def invsqrt_level(t: FloatArray, end: float) -> FloatArray:
    return 0.3 + 2.0 / np.sqrt(1.0 + 3.0 * t / end)


def make_noise(rng: np.random.Generator, n: int, kind: str, per_step: bool) -> FloatArray:
    """Unit-scale noise of one of the kinds in the module docstring."""
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "ar":
        rho, share = (0.98, 0.4) if per_step else (0.8, 0.5)
        innovations = rng.standard_normal(n) * math.sqrt(1.0 - rho * rho)
        ar = np.empty(n)
        ar[0] = rng.standard_normal()
        for i in range(1, n):
            ar[i] = rho * ar[i - 1] + innovations[i]
        return math.sqrt(1.0 - share) * rng.standard_normal(n) + math.sqrt(share) * ar
    if kind == "t2":
        # t(2) has median |x| = 0.8165; the standard normal 0.6745: same typical spread, far heavier tails.
        return rng.standard_t(2, n) * (0.6745 / 0.8165)
    if kind == "spikes":
        base = rng.standard_normal(n)
        rate = 0.005 if per_step else 0.05
        hits = rng.random(n) < rate
        base[hits] += rng.uniform(10.0, 50.0, int(hits.sum()))
        return base
    raise ValueError(f"unknown noise kind {kind!r}")


def _curve(
    index: int,
    seed: int,
    *,
    name: str,
    family: str,
    kind: Kind,
    level: Callable[[FloatArray], FloatArray],
    noise: str,
    cv: float,
    onset: int | None,
    false_before: int | None,
    group: str,
) -> Curve:
    rng = np.random.default_rng([seed, index])
    per_step = kind == "per-step"
    if per_step:
        steps = np.arange(1, STEP_POINTS + 1, dtype=np.int64)
        spe = 1
    else:
        steps = np.arange(1, EPOCH_POINTS + 1, dtype=np.int64) * STEPS_PER_EPOCH
        spe = STEPS_PER_EPOCH
    clean = level(steps.astype(np.float64))
    values = np.maximum(clean + cv * clean * make_noise(rng, steps.size, noise, per_step), CLIP)
    return Curve(
        name=name,
        family=family,
        kind=kind,
        steps=steps,
        values=values,
        onset=onset,
        lr=LR,
        false_before=false_before,
        group=group,
        steps_per_epoch=spe,
        info={"noise": noise, "cv": cv},
    )


def make_curves(seed: int = 0) -> list[Curve]:
    """All synthetic curves: plateaus (per step and per epoch) and negative controls, in a fixed order."""
    curves: list[Curve] = []
    fb = false_before_fraction()

    def add(**kwargs: object) -> None:
        curves.append(_curve(len(curves), seed, **kwargs))  # type: ignore[arg-type]

    for kind, family, length, noises, levels in (
        ("per-step", "synth-step", STEP_POINTS, ("gauss", "ar", "t2", "spikes"), STEP_NOISE),
        ("per-epoch", "synth-epoch", EPOCH_POINTS * STEPS_PER_EPOCH, ("gauss", "ar", "spikes"), EPOCH_NOISE),
    ):
        for fraction in ONSET_FRACTIONS:
            onset = round(fraction * length)
            for noise in noises:
                for level_name, cv in levels.items():
                    add(
                        name=f"{family}/{noise}-{level_name}-onset{fraction:.2f}",
                        family=family,
                        kind=kind,
                        level=lambda t, T=onset: plateau_level(t, T),
                        noise=noise,
                        cv=cv,
                        onset=onset,
                        false_before=round(fb * onset),
                        group=f"{noise}-{level_name}",
                    )

    step_end, epoch_end = float(STEP_POINTS), float(EPOCH_POINTS * STEPS_PER_EPOCH)
    controls: list[tuple[Kind, str, str, str, float, float]] = [
        ("per-step", "linear", "gauss", "low", STEP_NOISE["low"], step_end),
        ("per-step", "linear", "gauss", "mid", STEP_NOISE["mid"], step_end),
        ("per-step", "linear", "ar", "mid", STEP_NOISE["mid"], step_end),
        ("per-step", "linear", "t2", "low", STEP_NOISE["low"], step_end),
        ("per-step", "linear", "spikes", "low", STEP_NOISE["low"], step_end),
        ("per-step", "invsqrt", "gauss", "low", STEP_NOISE["low"], step_end),
        ("per-epoch", "linear", "gauss", "low", EPOCH_NOISE["low"], epoch_end),
        ("per-epoch", "linear", "gauss", "mid", EPOCH_NOISE["mid"], epoch_end),
        ("per-epoch", "linear", "spikes", "low", EPOCH_NOISE["low"], epoch_end),
        ("per-epoch", "invsqrt", "gauss", "low", EPOCH_NOISE["low"], epoch_end),
    ]
    for kind, shape, noise, level_name, cv, end in controls:
        family = "control-step" if kind == "per-step" else "control-epoch"
        fn = linear_level if shape == "linear" else invsqrt_level
        add(
            name=f"{family}/{shape}-{noise}-{level_name}",
            family=family,
            kind=kind,
            level=lambda t, f=fn, e=end: f(t, e),
            noise=noise,
            cv=cv,
            onset=None,
            false_before=None,
            group=f"{shape}-{noise}-{level_name}",
        )
    return curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List the synthetic curves and their ground truth.")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    args = parser.parse_args(argv)
    rows: list[list[object]] = []
    for c in make_curves(args.seed):
        tail = c.values[-len(c.values) // 5 :]
        rows.append([
            c.name, c.kind, len(c.steps), c.length, c.onset if c.onset is not None else "-",
            c.false_before if c.false_before is not None else "-", c.info["cv"],
            float(np.median(c.values)), float(tail.std() / tail.mean()), float(c.values.max()),
        ])  # fmt: skip
    print_table(
        "Synthetic curves",
        ["name", "kind", "points", "length", "onset", "false before", "cv", "median", "cv last 20%", "max"],
        rows,
    )


if __name__ == "__main__":
    main()
