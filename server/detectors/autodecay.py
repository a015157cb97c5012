"""AutoDecay: the stage has ended when the loss has stopped improving beyond what the current LR allows.

*Learning Stages* (You, Long, Wang, Jordan; arXiv 1908.01878) explains stages by SGD noise: at a given learning
rate, the network learns the patterns that noise level lets it learn, and then the loss only hovers. The
paper names its detector AutoDecay but its rule is not public, so this is **our own design** on that
mechanism; every default below was chosen with ``benchmarks/bench_detection.py``.

The rule, evaluated each time a block of points completes, within the current stage (points since the last
decay, after ``warmup``):

1. Points are summarised by block medians (``block`` points each, doubling as the stage grows so that a stage
   holds at most ``2 * max_blocks`` blocks): medians ignore heavy-tailed spikes, and blocks average the
   SGD noise of per-step losses.
2. *Recent rate* ``r``: the least-squares slope of the block medians over the last ``window`` share of the
   stage (at least ``min_window_blocks`` blocks), as an improvement per step, with its standard error ``se``.
3. *Stage rate* ``R``: the improvement per step from the start of the stage (median of as many first blocks
   as the recent window has) to now (the fitted value at the end of the recent window).
4. The stage has ended when, after ``min_stage`` points and on ``confirm`` consecutive tests, even the
   optimistic recent rate ``r + z * se`` is below ``rho`` times the reference pace ``max(R, R_prev)``
   (``R_prev``: the pace of the stages that already ended): the loss now improves at less than ``rho`` of
   the pace this run has shown, with confidence. A slow but steady decline keeps ``r`` close to ``R`` and
   never triggers; a curve that dropped and flattened does; a stage that starts flat ends once its noise is
   small enough to show it is flat. With no pace to compare with (a first stage that has not improved at
   all) nothing is decided.
5. The decision is a decay by ``factor``, unless ``max_decays`` decays were made or the new LR would fall
   below ``min_lr``: then it is *stop* — the last stage has ended, which is where the time saving comes from.

Everything is O(1) amortised per point: prefix sums over the blocks give any window's regression at once,
and merging blocks (when a stage doubles) rebuilds them in time proportional to the blocks merged.
"""

from __future__ import annotations

import math
from statistics import NormalDist, median
from typing import Any, Literal

from pydantic import Field, model_validator

from server.detectors import register
from server.detectors.base import Action, Decision, Detector, DetectorParams, Evidence

# Per-step minibatch losses are noisy, heavy-tailed and autocorrelated (at LR 0.1 on MNIST-1D: coefficient of
# variation ~0.55, lag-1 autocorrelation ~0.4); per-epoch means are few. Each gets its own defaults, chosen
# with benchmarks/bench_detection.py; any field given explicitly wins over the preset.
# Measured (see the README's detection table): the epoch preset finds 18/18 synthetic and 3/3 real
# constant-LR plateaus with no false decay on steady declines; for the step preset, 64-point blocks are what
# keeps autocorrelated minibatch noise from triggering on a steady decline (32-point blocks: 1 in 6 did).
PRESETS: dict[str, dict[str, Any]] = {
    "epoch": {"block": 1, "min_stage": 10, "confirm": 2, "window": 0.3, "z": 1.0},
    "step": {"block": 64, "min_stage": 1000, "confirm": 3, "window": 0.25, "z": 1.64},
}


class AutoDecayParams(DetectorParams):
    preset: Literal["epoch", "step"] = Field(
        default="epoch", description="Defaults for per-epoch metrics or for a noisy per-step loss."
    )
    mode: Literal["min", "max"] = Field(default="min", description="min for a loss, max for an accuracy.")
    factor: float = Field(default=0.1, gt=0, lt=1, description="LR multiplier of a decay.")
    rho: float = Field(default=0.2, gt=0, lt=1, description="Ended when the recent rate < rho x stage rate.")
    z: float = Field(default=1.64, ge=0, description="Normal quantile of the recent-rate bound (1.64: 95%).")
    window: float = Field(default=0.25, gt=0, le=1, description="Recent window, as a share of the stage.")
    min_window_blocks: int = Field(default=8, ge=3)
    block: int = Field(default=1, ge=1, description="Points per block at the start of a stage.")
    max_blocks: int = Field(default=128, ge=16, description="Blocks double in size beyond twice this many.")
    warmup: int = Field(default=0, ge=0, description="Points ignored at the start of the run (LR warm-up).")
    min_stage: int = Field(default=20, ge=2, description="Points a stage lasts at least.")
    confirm: int = Field(default=3, ge=1, description="Consecutive tests that must agree before deciding.")
    max_decays: int = Field(default=2, ge=0, description="After this many decays, the next stage end is a stop.")
    min_lr: float = Field(default=0.0, ge=0, description="A decay below this LR becomes a stop.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = PRESETS.get(str(data.get("preset", "epoch")), {})
            return {**preset, **data}
        return data


class _Stage:
    """Block medians of the current stage with prefix sums of x, y, xx, xy, yy for O(1) regressions."""

    def __init__(self, start_step: int, block: int) -> None:
        self.start_step = start_step
        self.block = block
        self.pending_steps: list[int] = []
        self.pending_values: list[float] = []
        self.xs: list[float] = []  # block positions: mean step of the block, relative to the stage start
        self.ys: list[float] = []  # block medians
        self.points = 0
        self._prefix: list[tuple[float, float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0, 0.0)]

    def add(self, step: int, value: float) -> bool:
        """Add a point; True when it completed a block."""
        self.points += 1
        self.pending_steps.append(step)
        self.pending_values.append(value)
        if len(self.pending_values) < self.block:
            return False
        # Positions relative to the stage start keep the prefix sums well conditioned at large step numbers.
        position = sum(self.pending_steps) / len(self.pending_steps) - self.start_step
        self._append_block(position, median(self.pending_values))
        self.pending_steps, self.pending_values = [], []
        return True

    def _append_block(self, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)
        sx, sy, sxx, sxy, syy = self._prefix[-1]
        self._prefix.append((sx + x, sy + y, sxx + x * x, sxy + x * y, syy + y * y))

    def merge_if_full(self, max_blocks: int) -> None:
        if len(self.ys) < 2 * max_blocks:
            return
        xs, ys = self.xs, self.ys
        self.xs, self.ys, self._prefix = [], [], [(0.0, 0.0, 0.0, 0.0, 0.0)]
        for i in range(0, len(ys) - 1, 2):
            self._append_block((xs[i] + xs[i + 1]) / 2, (ys[i] + ys[i + 1]) / 2)
        self.block *= 2

    def regression(self, first: int) -> tuple[float, float, float] | None:
        """Slope, its standard error and the fitted value at the last block, over blocks ``first..end``."""
        n = len(self.ys) - first
        if n < 3:
            return None
        a, b = self._prefix[first], self._prefix[-1]
        sx, sy, sxx, sxy, syy = (b[i] - a[i] for i in range(5))
        mx, my = sx / n, sy / n
        vxx = sxx - sx * mx
        if vxx <= 0:
            return None
        slope = (sxy - sx * my) / vxx
        rss = max(0.0, (syy - sy * my) - slope * (sxy - sx * my))
        se = math.sqrt(rss / (n - 2) / vxx)
        return slope, se, my + slope * (self.xs[-1] - mx)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "block": self.block,
            "pending_steps": self.pending_steps,
            "pending_values": self.pending_values,
            "xs": self.xs,
            "ys": self.ys,
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Stage:
        stage = cls(data["start_step"], data["block"])
        stage.pending_steps = list(data["pending_steps"])
        stage.pending_values = list(data["pending_values"])
        stage.points = data["points"]
        for x, y in zip(data["xs"], data["ys"], strict=True):
            stage._append_block(x, y)
        return stage


@register
class AutoDecay(Detector[AutoDecayParams]):
    """Our stage-end detector (see the module docstring for the rule and its rationale)."""

    name = "autodecay"
    Params = AutoDecayParams

    def __init__(self, params: AutoDecayParams) -> None:
        super().__init__(params)
        self.seen = 0
        self.decays = 0
        self.stopped = False
        self.reference_rate = 0.0  # the fastest pace of a stage that already ended
        self.agreeing = 0  # consecutive tests that found the stage ended
        self.stage: _Stage | None = None

    def _update(self, step: int, value: float) -> list[Decision]:
        p = self.params
        self.seen += 1
        if self.stopped or self.seen <= p.warmup or not math.isfinite(value):
            return []
        if self.stage is None:
            self.stage = _Stage(step, p.block)
        loss = value if p.mode == "min" else -value
        if not self.stage.add(step, loss):
            return []
        self.stage.merge_if_full(p.max_blocks)
        if self.stage.points < p.min_stage:
            return []
        decision = self._test(step)
        if decision is not None:
            self.stage = None  # the next point starts the next stage
        return [decision] if decision is not None else []

    def _test(self, step: int) -> Decision | None:
        p, stage = self.params, self.stage
        assert stage is not None
        n = len(stage.ys)
        width = max(p.min_window_blocks, math.ceil(p.window * n))
        if n < width + 1:
            return None
        fit = stage.regression(n - width)
        if fit is None:
            return None
        slope, se, level_now = fit
        level_start = median(stage.ys[:width])
        elapsed = stage.xs[-1] - stage.xs[(width - 1) // 2]
        stage_rate = (level_start - level_now) / elapsed if elapsed > 0 else 0.0
        recent_rate = -slope
        optimistic = recent_rate + p.z * se
        pace = max(stage_rate, self.reference_rate)
        threshold = p.rho * pace
        if pace <= 0 or optimistic >= threshold:
            self.agreeing = 0
            return None
        # One test per block is many tests: a single pass could be noise. Several in a row are not.
        self.agreeing += 1
        if self.agreeing < p.confirm:
            return None
        self.agreeing = 0
        self.reference_rate = pace
        window_start = stage.start_step + int(stage.xs[n - width])
        details: dict[str, float | int | str | None] = {
            "stage_start_step": stage.start_step,
            "stage_rate_per_step": stage_rate,
            "reference_rate_per_step": pace,
            "recent_rate_per_step": recent_rate,
            "recent_rate_se": se,
            "level_at_stage_start": level_start if p.mode == "min" else -level_start,
            "level_now": level_now if p.mode == "min" else -level_now,
            "block_points": stage.block,
            "rho": p.rho,
        }
        metric = "loss" if p.mode == "min" else "metric"
        whose = "this stage's average" if stage_rate >= self.reference_rate else "the pace of earlier stages,"
        bound = f"{NormalDist().cdf(p.z):.0%} bound"
        progress = (
            f"improved at most {optimistic:.3g} per step ({bound})"
            if optimistic > 0
            else f"did not improve (best case {optimistic:.3g} per step, {bound})"
        )
        sentence = (
            f"Over steps {window_start}-{step} the {metric} {progress}, under {p.rho:.0%} of {whose} "
            f"{pace:.3g} per step: the stage that began at step {stage.start_step} has ended."
        )
        stop = self.decays >= p.max_decays or (self.lr is not None and self.lr * p.factor < p.min_lr)
        if stop:
            self.stopped = True
            sentence += " It was the last stage: stop training."
        evidence = Evidence(
            window=(window_start, step),
            statistic="recent improvement rate, upper bound (per step)",
            value=optimistic,
            threshold=threshold,
            explanation=sentence,
            details=details,
        )
        if stop:
            return Decision(step=step, action="stop", factor=1.0, lr=self.lr, evidence=evidence)
        self.decays += 1
        return Decision(step=step, action="decay", factor=p.factor, lr=self._decayed(p.factor), evidence=evidence)

    def not_applied(self, action: Action) -> None:
        """A decay (or stop) that did not happen does not count towards ``max_decays``; the stage that was
        judged over starts again, so the next proposal needs a full ``min_stage`` of new evidence."""
        if action == "decay":
            self.decays = max(0, self.decays - 1)
        self.stopped = False
        self.stage = None
        self.agreeing = 0

    def set_lr(self, lr: float) -> None:
        """An LR change this detector did not decide (a schedule, a person) starts a new stage."""
        if self.lr is not None and lr != self.lr:
            self.stage = None
            self.agreeing = 0
        super().set_lr(lr)

    def _state(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "decays": self.decays,
            "stopped": self.stopped,
            "reference_rate": self.reference_rate,
            "agreeing": self.agreeing,
            "stage": None if self.stage is None else self.stage.to_dict(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.decays = state["decays"]
        self.stopped = state["stopped"]
        self.reference_rate = state["reference_rate"]
        self.agreeing = state["agreeing"]
        self.stage = None if state["stage"] is None else _Stage.from_dict(state["stage"])
