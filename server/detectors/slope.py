"""Slope: dlib's automatic learning-rate shrinking (``dnn_trainer``), on a per-step training-loss series.

Source: davisking/dlib ``dlib/statistics/running_gradient.h`` (``count_steps_without_decrease`` and its robust
variant) and ``dlib/dnn/trainer.h`` (the budget, the shrink, the dump of old values, the stop at
``min_learning_rate``); described in the dlib blog post "Automatic Learning Rate Scheduling That Really Works"
(Davis King, 2018).

The two count functions are vectorised: one pass of cumulative sums over the newest-first series gives the
least-squares fit of every suffix at once, so a check of a 2000-value window costs a few dozen microseconds.
A check first runs an O(n) pre-check of the whole window (``clearly_decreasing``): while the loss is still
clearly falling the count cannot reach the window, and the count is skipped. Decisions are the same as
with the counts alone (tested); only the cost changes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy.special import ndtri

from server.detectors import register
from server.detectors.base import Decision, Detector, DetectorParams, Evidence

FloatArray = NDArray[np.float64]


class _Grid:
    """Constants of the regressions on x = 0, 1, 2, ... for every prefix length n, grown on demand.

    The arrays are replaced together, in one assignment, so that concurrent detectors never see a mix."""

    def __init__(self) -> None:
        self._arrays: tuple[FloatArray, ...] = ()
        self._size = 0

    def get(self, size: int) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
        """(x, Sx / n, 1 / n, 1 / Sxx, 1 / ((n - 2) Sxx)) for n = 1 .. size (x = n - 1, Sxx centred)."""
        arrays = self._arrays
        if not arrays or arrays[0].size < size:
            grown = max(size, 2 * (arrays[0].size if arrays else 0), 64)
            x = np.arange(grown, dtype=np.float64)
            n = x + 1.0
            # Centred sum of squares of 0 .. n-1: n (n^2 - 1) / 12, exact in float64 for any realistic n.
            sxx = n * (n * n - 1.0) / 12.0
            with np.errstate(divide="ignore"):  # n = 1, 2: never used
                arrays = (x, 0.5 * x, 1.0 / n, 1.0 / sxx, 1.0 / ((n - 2.0) * sxx))
            self._arrays = arrays
        x, half_x, inv_n, inv_sxx, inv_dof_sxx = (a[:size] for a in arrays)
        return x, half_x, inv_n, inv_sxx, inv_dof_sxx


_GRID = _Grid()


def _not_decreasing(newest_first: FloatArray, probability: float) -> NDArray[np.bool_]:
    """dlib's test for every suffix at once: entry i says whether the newest i + 1 values fail to show a
    decrease with probability ``probability`` (entries 0 and 1, fewer than 3 values, are False).

    Model y = m x + b + e, e ~ N(0, s^2), x = 0 for the newest value: m = Sxy / Sxx (centred sums),
    s^2 = RSS / (n - 2), SE^2 = s^2 / Sxx = s^2 * 12 / (n^3 - n) as in dlib's ``running_gradient``. On the
    newest-first series dlib tests ``P(gradient > 0) < p`` with P(gradient > 0) = 1 - normal_cdf(0; m, SE) =
    Phi(m / SE): "the chance that the loss decreases (forward in time) is below p", i.e. m < z SE with
    z = Phi^-1(p) > 0. For m <= 0 that always holds (with SE = 0, dlib's normal_cdf is a step and gives
    P = 0 for m < 0 and 0.5 < p for m = 0); for m > 0 it is m^2 < z^2 SE^2, so no square root is needed.
    """
    size = newest_first.size
    x, half_x, inv_n, inv_sxx, inv_dof_sxx = _GRID.get(size)
    # Shifting y changes neither slope nor residuals; subtracting the newest value keeps the cumulative sums
    # small (no cancellation when the loss is large and its changes tiny) and a constant series exactly zero.
    y = newest_first - newest_first[0]
    sy = np.add.accumulate(y)[2:]
    sxy = np.add.accumulate(x * y)[2:]
    syy = np.add.accumulate(y * y)[2:]
    sxy -= half_x[2:] * sy  # centred: Sxy - Sx Sy / n
    syy -= sy * sy * inv_n[2:]  # centred: Syy - Sy^2 / n
    slope = sxy * inv_sxx[2:]
    syy -= slope * sxy  # RSS (may round below zero when the fit is exact: then SE = 0)
    z = float(ndtri(probability))
    result = np.zeros(size, dtype=np.bool_)
    result[2:] = (slope <= 0.0) | (slope * slope < (z * z) * syy * inv_dof_sxx[2:])
    return result


def _last_true(mask: NDArray[np.bool_]) -> int:
    """Index of the last True entry, -1 if none (argmax stops at the first hit)."""
    reverse = mask[::-1]
    i = int(reverse.argmax())
    return mask.size - 1 - i if reverse[i] else -1


def _std_round(x: float) -> int:
    """C++ ``std::round`` for x >= 0: halves away from zero (Python's round() goes to even)."""
    k = math.floor(x)
    return k + 1 if x - k >= 0.5 else k


def upper_quantile(values: FloatArray, quantile: float) -> float:
    """dlib ``find_upper_quantile``: the value at ascending index round((N - 1) * (1 - quantile))."""
    index = _std_round((values.size - 1) * (1.0 - quantile))
    return float(np.partition(values, index)[index])


# Margin, in units of the slope's standard error, by which the pre-check must clear dlib's threshold. Rounding
# moves z = slope / SE by about 1e-16 * sqrt(n) * (range / noise): below 1e-8 even for a 2000-value window
# whose range is a million times its noise. 1e-6 is far above that and far below any meaningful z.
_PRECHECK_MARGIN = 1e-6


def clearly_decreasing(values: FloatArray, probability: float = 0.51) -> bool:
    """O(n) pre-check of the whole series (oldest first): True when its least-squares line falls with
    P(slope < 0) above ``probability`` by a margin far beyond rounding. Then the full series does not pass
    dlib's test, so ``count_steps_without_decrease(values) < len(values)`` for certain; the detector only
    needs to know whether the count reaches the window, so it skips the count. Never decides on its own: a
    False only means "run the exact count"."""
    n = values.size
    if n < 3:
        return False
    x = _GRID.get(n)[0]
    y = values - values[-1]
    sy = float(y.sum())
    sxy = float(np.dot(x, y)) - 0.5 * (n - 1) * sy  # centred, forward in time
    if sxy >= 0.0:
        return False  # not falling at all
    sxx = n * (n * n - 1.0) / 12.0
    slope = sxy / sxx
    rss = float(np.dot(y, y)) - sy * sy / n - slope * sxy
    z = float(ndtri(probability)) + _PRECHECK_MARGIN
    return slope * slope > z * z * rss / ((n - 2.0) * sxx)


def count_steps_without_decrease(values: FloatArray, probability: float = 0.51) -> int:
    """dlib ``count_steps_without_decrease``: the largest k such that the newest k values (k >= 3) do not
    show a decrease with probability ``probability``; 0 if there is none. ``values`` are oldest first."""
    if values.size < 3:
        return 0
    return _last_true(_not_decreasing(values[::-1], probability)) + 1


def count_steps_without_decrease_robust(
    values: FloatArray, probability: float = 0.51, quantile_discard: float = 0.10
) -> int:
    """dlib ``count_steps_without_decrease_robust``: as the plain count, but values above the upper
    ``quantile_discard`` quantile of the whole series are left out of the regression. A left-out value still
    counts as a step (the count j advances) but not as a regression point (x advances only on kept values)."""
    size = values.size
    if size == 0:
        return 0
    threshold = upper_quantile(values, quantile_discard)
    newest_first = values[::-1]
    kept_at = np.flatnonzero(newest_first <= threshold)  # positions (newest = 0) of the regression points
    if kept_at.size < 3:
        return 0
    last = _last_true(_not_decreasing(newest_first[kept_at], probability))
    if last < 0:
        return 0
    k = last + 1  # the regression over the newest k kept values passes the test ...
    # ... and its state holds for every j up to the next kept value: the count is the last such j.
    return size if k == kept_at.size else int(kept_at[k])


def probability_of_decrease(values: FloatArray) -> tuple[float, float]:
    """(P(slope < 0) = Phi(-m / SE), m) for the least-squares slope m per point of ``values`` (oldest first,
    at least 3), with dlib's step for SE = 0."""
    n = values.size
    x = np.arange(n, dtype=np.float64)
    y = values - values[-1]
    sxx = n * (n * n - 1.0) / 12.0
    sxy = float(np.dot(x, y)) - 0.5 * (n - 1) * float(y.sum())
    m = sxy / sxx  # forward slope per point
    rss = float(np.dot(y, y)) - float(y.sum()) ** 2 / n - m * sxy
    s = math.sqrt(max(rss, 0.0) / (n - 2) / sxx)
    if s == 0.0:
        p = 1.0 if m < 0 else 0.0 if m > 0 else 0.5
    else:
        p = 0.5 * math.erfc((m / s) / math.sqrt(2.0))
    return p, m


class SlopeParams(DetectorParams):
    """dlib ``dnn_trainer`` settings, with its defaults."""

    window: int = Field(
        default=2000, ge=3, description="iter_without_progress_thresh: loss values kept and steps to wait."
    )
    probability: float = Field(
        default=0.51, gt=0.5, lt=1, description="A window is flat when P(loss decreasing) is below this."
    )
    quantile_discard: float = Field(
        default=0.10, ge=0, le=1, description="Robust re-check: the largest share of values left out."
    )
    factor: float = Field(default=0.1, gt=0, lt=1, description="learning_rate_shrink: LR multiplier of a decay.")
    dump_amount: int = Field(
        default=400, ge=0, description="previous_loss_values_dump_amount: after a decay, this + window/10 go."
    )
    budget_per_point: int = Field(
        default=200, ge=1, description="Check budget added per point; a check runs when it exceeds window."
    )
    min_lr: float = Field(
        default=1e-5, ge=0, allow_inf_nan=False, description="min_learning_rate: a decay below it is a stop."
    )


@register
class Slope(Detector[SlopeParams]):
    """dlib's automatic learning-rate shrink: decay when the whole window of recent losses stops decreasing.

    The rule (dlib ``dnn_trainer``, defaults in brackets)::

        each point: budget += budget_per_point [200]; keep only the newest `window` [2000] values
        if budget > window:                      # about window / 200 points between checks
            budget = 0
            if count_steps_without_decrease(values, p) >= window                        # p = 0.51
               and count_steps_without_decrease_robust(values, p, quantile_discard) >= window:   # 0.10
                lr *= factor [0.1]; drop the dump_amount + window // 10 [400 + 200] oldest values

    ``count_steps_without_decrease`` fits a least-squares line to every suffix of the newest values and
    returns the longest suffix whose P(slope < 0) = Phi(-slope / SE) is below ``p``; since the window holds at
    most ``window`` values, ``>= window`` means the whole window is flat or rising. The robust variant leaves
    out the values above the upper ``quantile_discard`` quantile, so a few spikes cannot fake a plateau.

    dlib's training ends once the LR falls below ``min_learning_rate`` [1e-5]: here, a decay whose new LR
    would be below ``min_lr`` is a ``stop`` instead (the LR is unchanged), after which the detector is quiet.
    That needs ``initial_lr``; with an unknown LR every decision is a decay. A non-finite loss is ignored
    (not stored, no budget): it says nothing about the slope (dlib itself reloads its last state on NaN).
    """

    name = "slope"
    Params = SlopeParams

    def __init__(self, params: SlopeParams) -> None:
        super().__init__(params)
        self.budget = 0
        self.stopped = False
        capacity = 2 * params.window
        self._values: FloatArray = np.empty(capacity, dtype=np.float64)
        self._steps: NDArray[np.int64] = np.empty(capacity, dtype=np.int64)
        self._start = 0
        self._end = 0

    # --- the window: a numpy ring that shifts down when full, so the newest values are always one slice ------

    def _push(self, step: int, value: float) -> None:
        if self._end == self._values.size:
            kept = self._end - self._start
            self._values[:kept] = self._values[self._start : self._end]
            self._steps[:kept] = self._steps[self._start : self._end]
            self._start, self._end = 0, kept
        self._values[self._end] = value
        self._steps[self._end] = step
        self._end += 1
        if self._end - self._start > self.params.window:
            self._start += 1

    def window_values(self) -> FloatArray:
        return self._values[self._start : self._end]

    def _update(self, step: int, value: float) -> list[Decision]:
        if self.stopped or not math.isfinite(value):
            return []
        p = self.params
        self.budget += p.budget_per_point
        self._push(step, value)
        if self.budget <= p.window:
            return []
        self.budget = 0
        values = self.window_values()
        if values.size < p.window:
            return []  # the counts are at most the number of values: they cannot reach the window yet
        if clearly_decreasing(values, p.probability):
            return []  # the whole window falls: the count is below the window (see clearly_decreasing)
        plain = count_steps_without_decrease(values, p.probability)
        if plain < p.window:
            return []
        robust = count_steps_without_decrease_robust(values, p.probability, p.quantile_discard)
        if robust < p.window:
            return []
        if self.lr is not None and self.lr * p.factor < p.min_lr:
            self.stopped = True
            evidence = self._evidence(values, plain, robust, stop=True)
            return [Decision(step=step, action="stop", factor=1.0, lr=self.lr, evidence=evidence)]
        evidence = self._evidence(values, plain, robust, stop=False)
        lr = self._decayed(p.factor)
        self._start = min(self._start + p.dump_amount + p.window // 10, self._end)
        return [Decision(step=step, action="decay", factor=p.factor, lr=lr, evidence=evidence)]

    def _evidence(self, values: FloatArray, plain: int, robust: int, *, stop: bool) -> Evidence:
        p = self.params
        first, last = int(self._steps[self._start]), int(self._steps[self._end - 1])
        p_decrease, slope = probability_of_decrease(values)
        threshold = upper_quantile(values, p.quantile_discard)
        kept = values[values <= threshold]
        p_robust, slope_robust = probability_of_decrease(kept) if kept.size >= 3 else (math.nan, math.nan)
        below = ""
        if stop and self.lr is not None:
            below = f" The next LR {self.lr * p.factor:.3g} would be below min_lr {p.min_lr:g}: training is done."
        return Evidence(
            window=(first, last),
            statistic="steps without decrease",
            value=float(robust),
            threshold=float(p.window),
            explanation=(
                f"Over the last {values.size} loss values (steps {first} to {last}) the loss is not going down: "
                f"the chance that it is decreasing is {p_decrease:.2f}, below {p.probability:g}, over the whole "
                f"window, and it stays below after leaving out the largest {p.quantile_discard:.0%} of values."
                f"{below}"
            ),
            details={
                "P(slope<0)": p_decrease,
                "slope_per_point": slope,
                "P(slope<0) robust": p_robust if math.isfinite(p_robust) else None,
                "slope_per_point robust": slope_robust if math.isfinite(slope_robust) else None,
                "steps_without_decrease": plain,
                "steps_without_decrease robust": robust,
                "discard_above": threshold,
                "probability": p.probability,
                "values_dropped": 0 if stop else min(p.dump_amount + p.window // 10, values.size),
            },
        )

    # --- state ---------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "stopped": self.stopped,
            "values": self.window_values().tolist(),
            "steps": self._steps[self._start : self._end].tolist(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.budget = int(state["budget"])
        self.stopped = bool(state["stopped"])
        values, steps = state["values"], state["steps"]
        if len(values) != len(steps) or len(values) > self.params.window:
            raise ValueError("slope state: values and steps must have the same length, at most the window")
        self._start, self._end = 0, len(values)
        self._values[: self._end] = np.asarray(values, dtype=np.float64)
        self._steps[: self._end] = np.asarray(steps, dtype=np.int64)
