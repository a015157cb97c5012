"""Stage segmentation of a recorded run: where each learning stage starts and ends, after the fact.

The detectors decide online, one point at a time; this module looks at a whole recorded curve at once (for
``stagewatch replay``, plots and benchmarks). Pure functions, no I/O, deterministic.

Stage boundaries come from two sources, merged:

**LR changes** (``lrs`` given). Missing LR values (``None`` or non-finite) carry the previous known value
forward; leading missing ones take the first known value. A *level* is a maximal run of points with the same
LR (relative tolerance 1e-6). Each level of at least ``min_stage`` points is a stage; shorter levels are
transitional (a warm-up ramp, a per-step cosine or linear schedule) and belong to the stage of the next long
level (the previous one at the end of the run). So StepDecay and manual schedules give one stage per LR, and a
schedule that changes the LR at every step gives no LR boundary at all.

**Sharp transitions in the curve itself** (for runs trained with a fixed schedule whose LR was not logged).
Non-finite values are left out of this analysis. With ``h`` points per half-window, the candidate boundary
*i* (the first point of a would-be new stage) is judged from four medians of ``h`` points each: ``b1, b2``
just before *i* (``b2`` the nearer) and ``a1, a2`` just after it (``a1`` the nearer)::

    trend = b2 - b1 or a2 - a1, whichever is smaller in size (the calmer side's change over h points)
    gap   = (a1 - b2) - trend

so ``gap`` is the jump of the curve at *i* that the local trend does not explain: a smooth decline, however
steep, or a kink gives ``gap`` near 0, while a decay's drop, even if it takes a few points to settle, shows in
full (its settling only steepens the *other* side). ``se`` is the standard error of ``gap``: a median of ``h``
points has variance ``pi sigma^2 / (2 h)`` for independent noise, ``sigma`` being the local noise (the median absolute
first difference over the side's ``2 h`` points, divided by ``0.6745 * sqrt(2)``: robust to trends, spikes
and the jump itself). Correlated noise (slow wiggles) makes medians vary more than that; the same estimate
made from the medians of blocks of ``s = max(1, h // 8)`` points (batch medians) then comes out larger, and
the median of that ratio over the whole run (at least 1) scales every variance. ``|gap| / se`` is the
*score*. *i* is a transition when all of these hold:

1. ``score >= noise_threshold``: well above the noise;
2. ``|gap| >= drop_threshold * max(|L|, |R|)`` with ``L = b2 + trend / 2`` and ``R = a1 - trend / 2`` (the
   levels either side of *i*): a relative minimum, so that tiny but precise wiggles don't count;
3. ``|gap| >= sharpness * max(|b2 - b1|, |a2 - a1|)``: sharp, the curve moves more at *i* than over ``h``
   points on either side (an early steep exponential phase fails this; a decay's drop passes);
4. its sign matches ``direction`` (``"decrease"``: drops only, ``"increase"``: rises only, ``"either"``).

Medians make heavy-tailed spikes, and bursts shorter than ``h / 2`` points, irrelevant. Candidates are
evaluated every ``s`` points (``h`` rounded down to a multiple of ``s``); those that pass are
taken in order of score (non-maximum suppression: none within ``min_stage`` points of one already taken) and
each is then placed exactly, at the point that best splits the ``2 h`` points around it into the two sides
of ``(L + R) / 2`` (fewest points on the wrong side); one within ``min_stage`` points of either end of the
run or of another transition is dropped. Rolling medians at stride ``s`` cost ``O(n h / s) = O(n)``; the
rest is ``O(n log n)`` at most.

**Merging.** A curve transition closer than ``min_stage`` points to an LR boundary is that same transition
(the LR change places it; its ``gap`` is kept in the stage's summary).

Defaults: ``min_stage = max(10, n // 20)`` points and ``h = max(3, min_stage // 2)``, so one side of the test
window is about the shortest stage. Measured on synthetic runs of 3000 points: in 80 StepDecay curves (two
drops, the smaller one 4 noise s.d., each settling over 15 points; Gaussian or Student-t(1.5) noise) every
drop was found, within 20 points, and nothing else; none of 480 smooth declines (exponential, power law,
linear; Gaussian, Student-t(1.5) or AR(1) noise with coefficient 0.7) was split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

Source = Literal["lr_change", "curve"]
Direction = Literal["decrease", "increase", "either"]
Summary = dict[str, float | int | None]
FloatArray = npt.NDArray[np.float64]

LR_REL_TOL = 1e-6
_SIGMA_PER_MEDIAN_ABS_DIFF = 1.0 / (0.6744897501960817 * math.sqrt(2.0))
_MEDIAN_CHUNK_VALUES = 1 << 22  # bounds the memory of the strided rolling medians (32 MiB of copies)


@dataclass(frozen=True)
class Stage:
    """One learning stage: points ``start_step`` to ``end_step`` (both included) of the recorded run."""

    index: int
    start_step: int
    end_step: int
    lr: float | None  # the LR of the longest LR level inside the stage; None without an LR column
    source: Source  # what placed the stage's start (the first stage: "lr_change" when an LR was known)
    summary: Summary = field(default_factory=dict)


@dataclass(frozen=True)
class _Boundary:
    index: int  # position of the stage's first point in the input
    source: Source
    gap: float | None = None  # the curve's jump there, when the curve shows one
    score: float | None = None  # |gap| / se


def segment(
    steps: Sequence[int],
    values: Sequence[float],
    lrs: Sequence[float | None] | None = None,
    *,
    min_stage: int | None = None,
    drop_threshold: float = 0.02,
    noise_threshold: float = 6.0,
    sharpness: float = 1.0,
    direction: Direction = "either",
    half_window: int | None = None,
) -> list[Stage]:
    """Split a recorded curve into learning stages (see the module docstring for the rule).

    ``steps`` strictly increase; ``values`` may hold NaN or infinities (they belong to a stage but are
    ignored by the curve test); ``lrs``, aligned with ``steps``, may hold ``None``. ``min_stage`` and
    ``half_window`` are counts of points. Returns the stages in order, covering every point; empty input
    gives no stage.
    """
    n = len(steps)
    if len(values) != n:
        raise ValueError(f"steps and values differ in length: {n} != {len(values)}")
    if lrs is not None and len(lrs) != n:
        raise ValueError(f"steps and lrs differ in length: {n} != {len(lrs)}")
    if min_stage is not None and min_stage < 2:
        raise ValueError(f"min_stage must be at least 2, not {min_stage}")
    if half_window is not None and half_window < 1:
        raise ValueError(f"half_window must be at least 1, not {half_window}")
    if drop_threshold < 0 or noise_threshold < 0 or sharpness < 0:
        raise ValueError("drop_threshold, noise_threshold and sharpness must not be negative")
    if n == 0:
        return []
    step_array = np.asarray(steps, dtype=np.int64)
    if n > 1 and not bool(np.all(np.diff(step_array) > 0)):
        bad = int(np.argmin(np.diff(step_array) > 0))
        raise ValueError(f"steps must strictly increase: {steps[bad + 1]} follows {steps[bad]}")
    x = np.asarray(values, dtype=np.float64)
    stage_len = min_stage if min_stage is not None else max(10, n // 20)
    h = half_window if half_window is not None else max(3, stage_len // 2)

    lr_array = _filled_lrs(lrs) if lrs is not None else None
    lr_bounds = _lr_boundaries(lr_array, stage_len) if lr_array is not None else []
    curve_bounds = _curve_boundaries(
        x,
        stage_len=stage_len,
        h=h,
        drop_threshold=drop_threshold,
        noise_threshold=noise_threshold,
        sharpness=sharpness,
        direction=direction,
    )
    bounds = _merge(lr_bounds, curve_bounds, stage_len)
    first_source: Source = "lr_change" if lr_array is not None else "curve"
    starts = [_Boundary(0, first_source), *bounds]
    stages = []
    for k, start in enumerate(starts):
        stop = starts[k + 1].index if k + 1 < len(starts) else n
        stages.append(
            Stage(
                index=k,
                start_step=int(step_array[start.index]),
                end_step=int(step_array[stop - 1]),
                lr=_stage_lr(lr_array[start.index : stop]) if lr_array is not None else None,
                source=start.source,
                summary=_summary(x[start.index : stop], start),
            )
        )
    return stages


# --- LR levels ---------------------------------------------------------------------------------------------


def _filled_lrs(lrs: Sequence[float | None]) -> FloatArray | None:
    """Forward-filled LRs (leading gaps take the first known value); None when no value is known."""
    out = np.array([math.nan if v is None else float(v) for v in lrs], dtype=np.float64)
    known = np.isfinite(out)
    if not bool(known.any()):
        return None
    positions = np.where(known, np.arange(len(out)), -1)
    np.maximum.accumulate(positions, out=positions)
    positions[positions < 0] = int(np.argmax(known))
    filled: FloatArray = out[positions]
    return filled


def _level_starts(lr: FloatArray) -> list[int]:
    """First index of each maximal run of (nearly) equal LRs."""
    a, b = lr[:-1], lr[1:]
    changed = np.abs(b - a) > LR_REL_TOL * np.maximum(np.abs(a), np.abs(b))
    return [0, *(np.flatnonzero(changed) + 1).tolist()]


def _lr_boundaries(lr: FloatArray, stage_len: int) -> list[_Boundary]:
    starts = _level_starts(lr)
    ends = [*starts[1:], len(lr)]
    long_levels = [s for s, e in zip(starts, ends, strict=True) if e - s >= stage_len]
    # A short level belongs to the next long one, so a boundary sits at the start of the run of short levels
    # just before each long level (after the first): a warm-up joins the stage of the LR it leads to.
    position = {s: k for k, s in enumerate(starts)}
    bounds = []
    for start in long_levels[1:]:
        k = position[start]
        while ends[k - 1] - starts[k - 1] < stage_len:  # the previous long level ends the walk
            k -= 1
        bounds.append(_Boundary(starts[k], "lr_change"))
    return bounds


def _stage_lr(lr: FloatArray) -> float:
    starts = _level_starts(lr)
    ends = [*starts[1:], len(lr)]
    longest = max(range(len(starts)), key=lambda k: ends[k] - starts[k])
    return float(lr[starts[longest]])


# --- curve transitions -------------------------------------------------------------------------------------


def _strided_medians(x: FloatArray, width: int, stride: int) -> FloatArray:
    """Medians of ``x[j : j + width]`` for ``j = 0, stride, 2 * stride, ...`` while the window fits."""
    windows = np.lib.stride_tricks.sliding_window_view(x, width)[::stride]
    out = np.empty(len(windows), dtype=np.float64)
    rows = max(1, _MEDIAN_CHUNK_VALUES // width)
    for lo in range(0, len(windows), rows):
        out[lo : lo + rows] = np.median(windows[lo : lo + rows], axis=1)
    return out


def _curve_boundaries(
    x_all: FloatArray,
    *,
    stage_len: int,
    h: int,
    drop_threshold: float,
    noise_threshold: float,
    sharpness: float,
    direction: Direction,
) -> list[_Boundary]:
    finite = np.flatnonzero(np.isfinite(x_all))
    x = x_all[finite]
    n = len(x)
    stride = max(1, h // 8)
    h = max(stride, h // stride * stride)
    if n < 4 * h + 1 or n < 2 * stage_len:
        return []
    k = h // stride
    med = _strided_medians(x, h, stride)  # med[m]: median of x[m*stride : m*stride + h]
    side_var = _side_variances(x, h, stride)  # side_var[m]: variance of a half-window median in x[m*s : m*s + 2h]
    # Candidate i = (m + 2k) * stride has b1 = med[m], b2 = med[m+k], a1 = med[m+2k], a2 = med[m+3k].
    count = min(len(med) - 3 * k, len(side_var) - 2 * k)
    if count <= 0:
        return []
    idx = np.arange(count)
    b1, b2, a1, a2 = med[idx], med[idx + k], med[idx + 2 * k], med[idx + 3 * k]
    var_b, var_a = side_var[idx], side_var[idx + 2 * k]
    before_change, after_change = b2 - b1, a2 - a1
    use_before = np.abs(before_change) <= np.abs(after_change)  # the calmer side gives the trend
    trend = np.where(use_before, before_change, after_change)
    gap = (a1 - b2) - trend
    # Var(a1 - 2 b2 + b1) or Var(2 a1 - a2 - b2)
    se = np.sqrt(np.where(use_before, var_a + 5 * var_b, 5 * var_a + var_b))
    left, right = b2 + trend / 2, a1 - trend / 2  # both sides carried to the boundary by the trend
    size = np.abs(gap)
    score = np.where(se > 0, size / np.where(se > 0, se, 1.0), math.inf)
    ok = (
        (size > 0)
        & (score >= noise_threshold)
        & (size >= drop_threshold * np.maximum(np.abs(left), np.abs(right)))
        & (size >= sharpness * np.maximum(np.abs(b2 - b1), np.abs(a2 - a1)))
    )
    if direction == "decrease":
        ok &= gap < 0
    elif direction == "increase":
        ok &= gap > 0
    candidates = (idx + 2 * k) * stride
    passing = np.flatnonzero(ok)
    order = passing[np.lexsort((candidates[passing], -size[passing], -score[passing]))]

    taken: list[_Boundary] = []
    coarse: list[int] = []
    for c in order.tolist():
        i = int(candidates[c])
        if any(abs(i - j) < stage_len for j in coarse):
            continue
        coarse.append(i)
        t = _place(x, i, h, float((left[c] + right[c]) / 2), rising=bool(gap[c] > 0))
        if t < stage_len or n - t < stage_len or any(abs(t - b.index) < stage_len for b in taken):
            continue
        taken.append(_Boundary(int(finite[t]), "curve", float(gap[c]), float(score[c])))
    return sorted(taken, key=lambda b: b.index)


def _side_variances(x: FloatArray, h: int, stride: int) -> FloatArray:
    """Variance of the median of ``h`` points, for each side (``2 h`` points) starting at a multiple of ``stride``.

    Point noise: the median absolute first difference over the side gives ``sigma`` and the variance
    ``pi sigma^2 / (2 h)``, right for independent noise. Correlated noise (slow wiggles) makes medians vary
    more: the same estimate made from the medians of blocks of ``stride`` points (``sigma_block^2 / (h / stride)``)
    then exceeds it. Their ratio, as a median over all sides (so that transitions and local bursts don't
    matter), and at least 1, scales every side's variance.
    """
    abs_diff = np.abs(np.diff(x))
    point_sigma = _strided_medians(abs_diff, 2 * h - 1, stride) * _SIGMA_PER_MEDIAN_ABS_DIFF
    point_var: FloatArray = math.pi / (2 * h) * point_sigma**2
    if stride == 1:
        return point_var
    k = h // stride
    blocks = _strided_medians(x, stride, stride)
    block_sigma = _strided_medians(np.abs(np.diff(blocks)), 2 * k - 1, 1) * _SIGMA_PER_MEDIAN_ABS_DIFF
    count = min(len(point_var), len(block_sigma))
    point_var = point_var[:count]
    block_var = block_sigma[:count] ** 2 / k
    both = point_var > 0
    inflation = float(np.median(block_var[both] / point_var[both])) if bool(both.any()) else 1.0
    scaled: FloatArray = point_var * max(1.0, inflation)
    return scaled


def _place(x: FloatArray, i: int, h: int, mid: float, *, rising: bool) -> int:
    """The split of ``x[i-h : i+h]`` with the fewest points on the wrong side of ``mid``."""
    lo, hi = max(0, i - h), min(len(x), i + h)
    window = x[lo:hi]
    after_side = window > mid if rising else window < mid
    # wrong(t) = after-side points before t + before-side points from t on, for t = lo .. hi.
    after_before = np.concatenate(([0], np.cumsum(after_side)))
    before_from = np.concatenate((np.cumsum((~after_side)[::-1])[::-1], [0]))
    wrong = after_before + before_from
    return lo + int(np.argmin(wrong))


# --- merging and summaries ---------------------------------------------------------------------------------


def _merge(lr_bounds: list[_Boundary], curve_bounds: list[_Boundary], stage_len: int) -> list[_Boundary]:
    """LR boundaries, each carrying the curve's jump there; curve ones far from every LR boundary."""
    lr_positions = np.array([b.index for b in lr_bounds], dtype=np.int64)
    merged = {b.index: b for b in lr_bounds}
    for b in curve_bounds:
        if len(lr_positions):
            nearest = int(lr_positions[np.argmin(np.abs(lr_positions - b.index))])
            if abs(nearest - b.index) < stage_len:
                known = merged[nearest]
                if known.score is None or (b.score is not None and b.score > known.score):
                    merged[nearest] = _Boundary(nearest, "lr_change", b.gap, b.score)
                continue
        merged[b.index] = b
    return [merged[i] for i in sorted(merged)]


def _summary(x: FloatArray, start: _Boundary) -> Summary:
    finite = x[np.isfinite(x)]
    out: Summary = {"points": len(x), "nonfinite": len(x) - len(finite)}
    if len(finite):
        out.update(
            first=float(finite[0]),
            last=float(finite[-1]),
            min=float(finite.min()),
            max=float(finite.max()),
            mean=float(finite.mean()),
            median=float(np.median(finite)),
        )
    else:
        out.update(first=None, last=None, min=None, max=None, mean=None, median=None)
    out["gap"] = start.gap
    out["gap_score"] = start.score if start.score is None or math.isfinite(start.score) else None
    return out
