"""AutoDecay: the stage has ended when the metric has stopped improving beyond what noise or its own pace explain.

*Learning Stages* (You, Long, Wang, Jordan; arXiv 1908.01878) explains stages by SGD noise: at a given learning
rate, the network learns the patterns that noise level lets it learn, and then the metric only hovers. The
paper names its detector AutoDecay but its rule is not public, so this is **our own design** on that
mechanism. Two rules judge a stage (points since the last decay, after ``warmup``), each evaluated when a block
of points completes; blocks are block medians (``block`` points each, doubling as the stage grows so that a
stage holds at most ``2 * max_blocks`` blocks): medians ignore heavy-tailed spikes, and blocks average the SGD
noise of per-step losses.

``rule="best"`` (the ``epoch`` preset: per-epoch metrics such as test accuracy, which zig-zag at a large LR):

1. *Level*: the running mean of the last ``smooth`` blocks of the stage, and its best value so far.
2. *Recent gain* ``g``: how much the best level improved during the recent window (the last ``window`` share
   of the stage, at least ``min_window_blocks`` and at most ``max_window_blocks`` blocks): the best before the
   window minus the best now. The cap keeps a long, zig-zagging stage from being judged on a window so wide
   that the luckiest epoch in it, not a trend, moves the best.
3. *Noise margin* ``delta = z * sigma * sqrt(2 / smooth)``: ``z`` times the noise of a difference of two levels,
   with the per-block noise ``sigma`` estimated from the mean absolute second difference within the window
   (``sigma = mean|y_t - 2 y_(t-1) + y_(t-2)| * sqrt(pi / 12)`` for Gaussian noise): second differences cancel
   a linear trend, so a stage that is still climbing fast does not pass its own climb off as noise.
   *Pace margin* ``rho * G * w / n``: ``rho`` times what the stage's average pace (its whole gain ``G`` over
   its ``n`` blocks) would have gained over the ``w`` blocks of the window.
4. The stage has ended when, after ``min_stage`` points and on ``confirm`` consecutive tests, ``g`` is within
   the larger of the two margins: the best level has not improved by more than noise can explain, or by more
   than a small share of the stage's own pace. A curve that zig-zags without getting better ends its stage
   (its noise is large, its best does not move); a slow climb that beats the noise keeps it going; a
   noise-free curve that flattens ends it through the pace margin. There is no "no pace, no decision" case.
5. *Stages after an LR change* (a decay, or a change from a schedule or a person) are judged on their own
   terms, the ``later_*`` parameters: at a small LR the metric settles within an epoch or two and hardly
   zig-zags, so the epoch preset judges it on single epochs (``later_smooth=1``), a 3-epoch window, one test
   and a larger share of its pace (``later_rho``). The last stage's stop then comes a few epochs after that
   stage has settled, not ten: the same evidence, read at the noise level of that stage. A later stage that
   still climbs beyond its noise goes on (the terms are not a floor). A parameter given explicitly applies to
   every stage unless its ``later_`` counterpart is given too.

``rule="rate"`` (the ``step`` preset: noisy per-step minibatch losses):

1. *Recent rate* ``r``: the least-squares slope of the block medians over the recent window, as an
   improvement per step, with its standard error ``se``.
2. *Stage rate* ``R``: the improvement per step from the start of the stage (median of as many first blocks
   as the recent window has) to now (the fitted value at the end of the recent window).
3. The stage has ended when, after ``min_stage`` points and on ``confirm`` consecutive tests, even the
   optimistic recent rate ``r + z * se`` is below ``rho`` times the reference pace ``max(R, R_prev)``
   (``R_prev``: the pace of the stages that already ended). With no pace to compare with (a first stage that
   has not improved at all) this rule decides nothing.

Either way the decision is a decay by ``factor``, unless ``max_decays`` decays were made or the new LR would
fall below ``min_lr``: then it is *stop* -- the last stage has ended, judged by the same rule and evidence.

*Divergence* (:mod:`server.detectors.divergence`): a metric that goes back to its chance level (``chance``,
else the first value) or stops being a number is a collapse, not the end of a stage. It gets a ``stop`` whose
evidence says "Training diverged", at any time, even during warm-up for non-finite values.

Everything is O(1) amortised per point: prefix sums over the blocks give any window's statistics at once,
and merging blocks (when a stage doubles) rebuilds them in time proportional to the blocks merged.
"""

from __future__ import annotations

import math
from statistics import NormalDist, median
from typing import Any, Literal

from pydantic import Field, model_validator

from server.detectors import register
from server.detectors.base import Action, Decision, Detector, DetectorParams, Evidence
from server.detectors.divergence import DivergenceGuard

# Per-step minibatch losses are noisy, heavy-tailed and autocorrelated (at LR 0.1 on MNIST-1D: coefficient of
# variation ~0.55, lag-1 autocorrelation ~0.4); per-epoch metrics are few, and at a large LR a test accuracy
# zig-zags by tens of points from one epoch to the next. Each gets its own defaults; any field given explicitly
# wins over the preset. The step preset was chosen with benchmarks/bench_detection.py: 64-point blocks keep
# autocorrelated minibatch noise from triggering on a steady decline (32-point blocks: 1 in 6 did). The epoch
# preset was chosen with benchmarks/bench_time_to_accuracy.py on MNIST-1D (see the README for the settings it
# was tuned on and the held-out ones it was validated on).
PRESETS: dict[str, dict[str, Any]] = {
    "epoch": {
        "rule": "best",
        "rho": 0.1,
        "block": 1,
        "min_stage": 5,
        "confirm": 2,
        "window": 0.5,
        "min_window_blocks": 4,
        "max_window_blocks": 8,
        "z": 1.0,
        "smooth": 3,
        "later_smooth": 1,
        "later_min_window_blocks": 3,
        "later_min_stage": 3,
        "later_window": 0.3,
        "later_rho": 0.25,
        "later_confirm": 1,
        "diverge_points": 2,
        "diverge_nonfinite": 2,
    },
    "step": {
        "rule": "rate",
        "rho": 0.2,
        "block": 64,
        "min_stage": 1000,
        "confirm": 3,
        "window": 0.25,
        "min_window_blocks": 8,
        "z": 1.64,
        "diverge_points": 3,
        "diverge_nonfinite": 16,
    },
}


LATER_KEYS = ("smooth", "min_window_blocks", "window", "rho", "min_stage", "confirm")


class AutoDecayParams(DetectorParams):
    preset: Literal["epoch", "step"] = Field(
        default="epoch", description="Defaults for per-epoch metrics or for a noisy per-step loss."
    )
    rule: Literal["best", "rate"] = Field(
        default="best",
        description="best: the best smoothed level stopped improving beyond noise or pace; rate: the recent "
        "slope fell below rho x the stage's pace (see the module doc).",
    )
    mode: Literal["min", "max"] = Field(default="min", description="min for a loss, max for an accuracy.")
    factor: float = Field(default=0.1, gt=0, lt=1, description="LR multiplier of a decay.")
    rho: float = Field(default=0.1, gt=0, lt=1, description="Share of the stage's pace below which it has ended.")
    z: float = Field(default=1.0, ge=0, description="Normal quantile of the noise bound (1.64: 95%).")
    window: float = Field(default=0.3, gt=0, le=1, description="Recent window, as a share of the stage.")
    min_window_blocks: int = Field(default=4, ge=3)
    max_window_blocks: int | None = Field(
        default=None, ge=3, description="rule best: the recent window holds at most this many blocks (None: no cap)."
    )
    smooth: int = Field(default=3, ge=1, description="rule best: blocks in the running mean of the level.")
    later_smooth: int | None = Field(
        default=None,
        ge=1,
        description="rule best: smooth of a stage that follows an LR change (a small LR is less noisy); default "
        "smooth.",
    )
    later_min_window_blocks: int | None = Field(
        default=None, ge=3, description="min_window_blocks of a stage that follows an LR change; default the same."
    )
    later_window: float | None = Field(
        default=None, gt=0, le=1, description="window of a stage that follows an LR change; default the same."
    )
    later_rho: float | None = Field(
        default=None, gt=0, lt=1, description="rho of a stage that follows an LR change; default the same."
    )
    later_confirm: int | None = Field(
        default=None, ge=1, description="confirm of a stage that follows an LR change; default the same."
    )
    later_min_stage: int | None = Field(
        default=None, ge=2, description="min_stage of a stage that follows an LR change; default the same."
    )
    block: int = Field(default=1, ge=1, description="Points per block at the start of a stage.")
    max_blocks: int = Field(default=128, ge=16, description="Blocks double in size beyond twice this many.")
    warmup: int = Field(default=0, ge=0, description="Points ignored at the start of the run (LR warm-up).")
    min_stage: int = Field(default=5, ge=2, description="Points a stage lasts at least.")
    confirm: int = Field(default=2, ge=1, description="Consecutive tests that must agree before deciding.")
    max_decays: int = Field(default=2, ge=0, description="After this many decays, the next stage end is a stop.")
    min_lr: float = Field(default=0.0, ge=0, description="A decay below this LR becomes a stop.")
    chance: float | None = Field(
        default=None,
        description="The metric's chance level (ln K for a K-class loss, 1/K for an accuracy); default: the "
        "first value. A metric back there has diverged.",
    )
    diverge_share: float = Field(
        default=0.9, gt=0, le=1.5, description="Diverged when this share of the gain on chance is given back."
    )
    diverge_points: int = Field(default=2, ge=1, description="...on this many consecutive blocks.")
    diverge_nonfinite: int = Field(default=2, ge=1, description="Diverged after this many NaN/inf in a row.")
    diverge_min_gain: float = Field(
        default=0.5, ge=0, description="The chance rule arms once the best beats chance by this share of it."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = dict(PRESETS.get(str(data.get("preset", "epoch")), {}))
            # A value given explicitly holds for every stage unless its later_ value is given too: the preset's
            # later_ value was chosen against the preset's own first-stage value, not against this one.
            for key in LATER_KEYS:
                if key in data and f"later_{key}" not in data:
                    preset.pop(f"later_{key}", None)
            return {**preset, **data}
        return data


class _Stage:
    """Block medians of the current stage with prefix sums of x, y, xx, xy, yy for O(1) regressions, and for the
    ``best`` rule the running mean of the last ``smooth`` blocks, its prefix minimum and prefix sums of
    ``|y_t - 2 y_(t-1) + y_(t-2)|``."""

    def __init__(self, start_step: int, block: int, smooth: int = 1) -> None:
        self.start_step = start_step
        self.block = block
        self.smooth = smooth
        self.pending_steps: list[int] = []
        self.pending_values: list[float] = []
        self.xs: list[float] = []  # block positions: mean step of the block, relative to the stage start
        self.ys: list[float] = []  # block medians
        self.points = 0
        self._prefix: list[tuple[float, float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0, 0.0)]
        self.levels: list[float] = []  # running mean of the last `smooth` blocks
        self.best: list[float] = []  # prefix minimum of levels
        self.best_at: list[int] = []  # index of the block where that minimum was set
        self._absdiff2: list[float] = [0.0, 0.0]  # prefix sums of |y_i - 2 y_(i-1) + y_(i-2)| (i >= 2)

    def add(self, step: int, value: float) -> float | None:
        """Add a point; the median of the block it completed, if it did."""
        self.points += 1
        self.pending_steps.append(step)
        self.pending_values.append(value)
        if len(self.pending_values) < self.block:
            return None
        # Positions relative to the stage start keep the prefix sums well conditioned at large step numbers.
        position = sum(self.pending_steps) / len(self.pending_steps) - self.start_step
        value = median(self.pending_values)
        self._append_block(position, value)
        self.pending_steps, self.pending_values = [], []
        return value

    def _append_block(self, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)
        sx, sy, sxx, sxy, syy = self._prefix[-1]
        self._prefix.append((sx + x, sy + y, sxx + x * x, sxy + x * y, syy + y * y))
        n = len(self.ys)
        first = max(0, n - self.smooth)
        level = sum(self.ys[first:]) / (n - first)
        self.levels.append(level)
        if self.best and self.best[-1] <= level:
            self.best.append(self.best[-1])
            self.best_at.append(self.best_at[-1])
        else:
            self.best.append(level)
            self.best_at.append(n - 1)
        if n >= 3:
            self._absdiff2.append(self._absdiff2[-1] + abs(y - 2 * self.ys[-2] + self.ys[-3]))

    def merge_if_full(self, max_blocks: int) -> None:
        if len(self.ys) < 2 * max_blocks:
            return
        xs, ys = self.xs, self.ys
        self.xs, self.ys, self._prefix = [], [], [(0.0, 0.0, 0.0, 0.0, 0.0)]
        self.levels, self.best, self.best_at, self._absdiff2 = [], [], [], [0.0, 0.0]
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

    def noise(self, first: int) -> float:
        """The per-block noise over blocks ``first..end``, from their second differences: for Gaussian noise of
        standard deviation ``s`` a second difference has standard deviation ``s * sqrt(6)``, hence mean absolute
        value ``s * sqrt(12 / pi)``; a linear trend cancels."""
        n = len(self.ys)
        first = max(first, 0)
        count = n - 2 - first
        if count <= 0:
            return 0.0
        return (self._absdiff2[n - 1] - self._absdiff2[first + 1]) / count * math.sqrt(math.pi / 12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "block": self.block,
            "smooth": self.smooth,
            "pending_steps": self.pending_steps,
            "pending_values": self.pending_values,
            "xs": self.xs,
            "ys": self.ys,
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], smooth: int = 1) -> _Stage:
        """``smooth``: for a state saved before stages recorded theirs (the detector's parameter)."""
        stage = cls(data["start_step"], data["block"], data.get("smooth", smooth))
        stage.pending_steps = list(data["pending_steps"])
        stage.pending_values = list(data["pending_values"])
        stage.points = data["points"]
        for x, y in zip(data["xs"], data["ys"], strict=True):
            stage._append_block(x, y)
        return stage


@register
class AutoDecay(Detector[AutoDecayParams]):
    """Our stage-end detector (see the module docstring for the rules and their rationale)."""

    name = "autodecay"
    Params = AutoDecayParams

    def __init__(self, params: AutoDecayParams) -> None:
        super().__init__(params)
        self.seen = 0
        self.decays = 0
        self.stopped = False
        self.reference_rate = 0.0  # rule rate: the fastest pace of a stage that already ended
        self.agreeing = 0  # consecutive tests that found the stage ended
        self.lr_changes = 0  # LR changes this detector did not decide (a schedule, a person)
        self.stage: _Stage | None = None
        chance = params.chance
        self.guard = DivergenceGuard(
            chance=None if chance is None else (chance if params.mode == "min" else -chance),
            share=params.diverge_share,
            points=params.diverge_points,
            nonfinite=params.diverge_nonfinite,
            min_gain=params.diverge_min_gain,
        )

    def _update(self, step: int, value: float) -> list[Decision]:
        p = self.params
        self.seen += 1
        if self.stopped:
            return []
        if not math.isfinite(value):
            evidence = self.guard.non_finite(step, value)
            return [] if evidence is None else [self._diverged(step, evidence)]
        self.guard.nonfinite = 0
        if self.seen <= p.warmup:
            return []
        if self.stage is None:
            self.stage = _Stage(step, p.block, self._later(p.later_smooth, p.smooth))
        loss = value if p.mode == "min" else -value
        block_value = self.stage.add(step, loss)
        if block_value is None:
            return []
        evidence = self.guard.finite(step, block_value, sign=1.0 if p.mode == "min" else -1.0)
        if evidence is not None:
            return [self._diverged(step, evidence)]
        self.stage.merge_if_full(p.max_blocks)
        if self.stage.points < self._later(p.later_min_stage, p.min_stage):
            return []
        if self.guard.bad > 0:
            # A block back at chance: a collapse may be starting. Its jump is no evidence about the stage (it
            # would pass for noise), so the stage is not judged until the divergence rule has ruled it out.
            self.agreeing = 0
            return []
        decision = self._test_best(step) if p.rule == "best" else self._test_rate(step)
        if decision is not None:
            self.stage = None  # the next point starts the next stage
        return [decision] if decision is not None else []

    def _later(self, later: Any, first: Any) -> Any:
        """``later`` for a stage that follows an LR change (``first`` if not set), ``first`` for the first stage."""
        return first if later is None or self.decays + self.lr_changes == 0 else later

    def _diverged(self, step: int, evidence: Evidence) -> Decision:
        self.stopped = True
        self.stage = None
        self.agreeing = 0
        return Decision(step=step, action="stop", factor=1.0, lr=self.lr, evidence=evidence)

    def _agreed(self) -> bool:
        # One test per block is many tests: a single pass could be noise. Several in a row are not.
        self.agreeing += 1
        if self.agreeing < self._later(self.params.later_confirm, self.params.confirm):
            return False
        self.agreeing = 0
        return True

    def _test_best(self, step: int) -> Decision | None:
        p, stage = self.params, self.stage
        assert stage is not None
        n = len(stage.ys)
        smooth = stage.smooth
        min_width = self._later(p.later_min_window_blocks, p.min_window_blocks)
        width = max(min_width, math.ceil(self._later(p.later_window, p.window) * n))
        if p.max_window_blocks is not None:
            width = max(min_width, min(width, p.max_window_blocks))
        rho = self._later(p.later_rho, p.rho)
        if n < width + 1:
            return None
        before = n - width - 1  # the last block before the recent window
        gain = stage.best[before] - stage.best[-1]  # >= 0: how much the best level improved in the window
        stage_gain = stage.levels[0] - stage.best[-1]  # the stage's whole improvement of the level
        sigma = stage.noise(n - width)
        noise_margin = p.z * sigma * math.sqrt(2.0 / min(smooth, n))
        pace_margin = rho * max(stage_gain, 0.0) * width / n
        threshold = max(noise_margin, pace_margin)
        if gain > threshold:
            self.agreeing = 0
            return None
        if not self._agreed():
            return None
        sign = 1.0 if p.mode == "min" else -1.0
        window_start = stage.start_step + int(stage.xs[n - width])
        best_block = stage.best_at[-1]
        best_step = stage.start_step + int(stage.xs[best_block])
        unit = "block" if stage.block > 1 else "point"
        what = "loss" if p.mode == "min" else "metric"
        level = f"mean of the last {smooth} {unit}s" if smooth > 1 else f"{unit} value"
        why = (
            f"{p.z:g} x the noise of such a mean ({sigma:.3g} per {unit})"
            if noise_margin >= pace_margin
            else f"{rho:.0%} of what the stage's own pace would have gained in the window"
        )
        sentence = (
            f"Over steps {window_start}-{step} (the last {width} {unit}s of the stage) the best {level} of the "
            f"{what} improved by {gain:.3g}, not more than {threshold:.3g} ({why}); its best, "
            f"{sign * stage.best[-1]:.4g}, dates from step {best_step}: the stage that began at step "
            f"{stage.start_step} has ended."
        )
        details: dict[str, float | int | str | None] = {
            "rule": "best",
            "stage_start_step": stage.start_step,
            "stage_blocks": n,
            "window_blocks": width,
            "window_is_minimum": "yes" if width == min_width else "no",
            "best_level": sign * stage.best[-1],
            "best_step": best_step,
            "level_now": sign * stage.levels[-1],
            "level_at_stage_start": sign * stage.levels[0],
            "stage_gain": stage_gain,
            "noise_per_block": sigma,
            "noise_margin": noise_margin,
            "pace_margin": pace_margin,
            "block_points": stage.block,
            "smooth_blocks": smooth,
            "z": p.z,
            "rho": rho,
        }
        evidence = Evidence(
            window=(window_start, step),
            statistic=f"improvement of the best {level} over the recent window",
            value=gain,
            threshold=threshold,
            explanation=sentence,
            details=details,
        )
        return self._decide(step, evidence)

    def _test_rate(self, step: int) -> Decision | None:
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
        if not self._agreed():
            return None
        self.reference_rate = pace
        window_start = stage.start_step + int(stage.xs[n - width])
        details: dict[str, float | int | str | None] = {
            "rule": "rate",
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
        evidence = Evidence(
            window=(window_start, step),
            statistic="recent improvement rate, upper bound (per step)",
            value=optimistic,
            threshold=threshold,
            explanation=sentence,
            details=details,
        )
        return self._decide(step, evidence)

    def _decide(self, step: int, evidence: Evidence) -> Decision:
        p = self.params
        stop = self.decays >= p.max_decays or (self.lr is not None and self.lr * p.factor < p.min_lr)
        if stop:
            self.stopped = True
            evidence = Evidence(
                window=evidence.window,
                statistic=evidence.statistic,
                value=evidence.value,
                threshold=evidence.threshold,
                explanation=evidence.explanation + " It was the last stage: stop training.",
                details={**evidence.details, "reason": "last stage ended"},
            )
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
            self.lr_changes += 1
        super().set_lr(lr)

    def _state(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "decays": self.decays,
            "stopped": self.stopped,
            "reference_rate": self.reference_rate,
            "agreeing": self.agreeing,
            "lr_changes": self.lr_changes,
            "stage": None if self.stage is None else self.stage.to_dict(),
            "divergence": self.guard.to_dict(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]
        self.decays = state["decays"]
        self.stopped = state["stopped"]
        self.reference_rate = state["reference_rate"]
        self.agreeing = state["agreeing"]
        self.lr_changes = state.get("lr_changes", 0)  # absent in states saved before later stages had params
        self.stage = None if state["stage"] is None else _Stage.from_dict(state["stage"], self.params.smooth)
        if "divergence" in state:  # absent in states saved before the divergence check existed
            self.guard.load(state["divergence"])
