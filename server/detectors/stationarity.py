r"""Stationarity: the SASA+ test (Zhang, Lang, Liu, Xiao, arXiv:2002.10597; code ``microsoft/statopt``).

Source: microsoft/statopt ``statopt/sasa.py`` (``SASA.stats_adaptation``) and ``statopt/bucket.py``
(``LeakyBucket.add``, ``mean_std``, ``stats_test``), followed line by line; see ``Stationarity``.

What the worker sends
---------------------
Not the loss: a statistic of the optimizer, one value per optimizer step, logged as its own metric (for
instance ``"sasa_delta"``). For any update of the form ``x_{k+1} = x_k - alpha * d_k`` (SGD, SGD with
dampened or plain momentum, QHM), with ``alpha`` the learning rate in effect at step k and ``d_k`` the update
direction *including weight decay*, summed over all parameters::

    Delta_k = <x_{k+1}, d_k> + (alpha / 2) * ||d_k||^2

Why it is zero on average at stationarity: ``||x_{k+1}||^2 = ||x_k||^2 - 2 alpha <x_k, d_k> + alpha^2 ||d_k||^2``,
and once the iterates are stationary ``E||x_{k+1}||^2 = E||x_k||^2``, so ``E[<x_k, d_k> - (alpha/2)||d_k||^2] = 0``;
substituting ``x_k = x_{k+1} + alpha d_k`` gives ``E[Delta_k] = 0``. While the loss still goes down the
iterates move steadily and ``Delta_k`` is off zero on average; when the LR can take them no further, its mean
is zero. This holds "for a broad class of stochastic gradient algorithms without modification" (the paper).

Which ``d_k`` (one LR for all parameters, as in statopt):

* statopt ``QHM``/``SASA``: ``g <- g + wd * x; h <- (1 - beta) g + beta h; d = (1 - nu) g + nu h`` (nu = 1:
  dampened momentum, ``d = h``); ``x <- x - alpha d``.
* ``torch.optim.SGD`` (``nesterov=False``, ``maximize=False``): with ``momentum > 0``, ``d_k`` is
  ``state["momentum_buffer"]`` after the step (weight decay is already in it); with ``momentum = 0``,
  ``d_k = grad + wd * x_k``, which after the step is ``(grad + wd * x_{k+1}) / (1 - alpha * wd)``.
* Any other optimizer: ``d_k = (x_k - x_{k+1}) / alpha`` satisfies the identity exactly, at the cost of a
  copy of the parameters; the paper's guarantees, though, are for SGD/QHM.

It is cheap: two dot products per step over tensors already in memory (``x_{k+1}`` and ``d_k``), about two
extra reads of the parameters and no allocation the size of the model. Right after ``optimizer.step()``::

    alpha = optimizer.param_groups[0]["lr"]
    x1d = torch.zeros((), dtype=torch.float64, device=device)
    d2 = torch.zeros((), dtype=torch.float64, device=device)
    for group in optimizer.param_groups:
        wd = group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = optimizer.state[p].get("momentum_buffer")
            if d is None:  # momentum = 0: the direction is the gradient plus weight decay at x_k
                d = p.grad.add(p.detach(), alpha=wd).div_(1 - alpha * wd) if wd else p.grad
            x1d += torch.dot(p.detach().flatten(), d.flatten())
            d2 += torch.dot(d.flatten(), d.flatten())  # or: sum(n**2 for n in torch._foreach_norm(dirs))
    delta = x1d + 0.5 * alpha * d2   # a 0-d tensor: call .item() only when the value is sent, not every step

(statopt computes ``stats_x1d`` and ``0.5 * lr * stats_ld2`` the same way, from the parameters after the
update and its ``step_buffer``, then adds them.) After a decay the worker computes ``Delta`` with the new LR;
statopt also zeroes the momentum buffers at a drop.

Send one value per optimizer step: all counts below (``warmup``, ``min_samples``, ``test_every``) are in
points, which are optimizer steps when every step is sent, as in statopt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from scipy.special import stdtrit

from server.detectors import register
from server.detectors.base import Decision, Detector, DetectorParams, Evidence

FloatArray = NDArray[np.float64]
VarMode = Literal["bm", "olbm", "iid"]

INITIAL_BUCKET_SIZE = 1000  # statopt: LeakyBucket(1000, leak_ratio, ...)


@dataclass(frozen=True)
class TestResult:
    """One ``stats_test``: the t-interval of the mean of the bucket and the half-means."""

    stationary: bool
    mean: float
    half_width: float
    mean1: float
    mean2: float
    std: float
    dof: int
    batch: int  # batch size of the batch-means estimator (1 for iid)
    composite: bool


class LeakyBucket:
    """statopt's ``LeakyBucket`` (``fixed_len`` unused), in float64, with the step of each value kept too.

    Every value is appended; ``count`` grows by one only on every ``ratio``-th addition (the 1st, the
    ``ratio + 1``-th, ...), otherwise the oldest kept value leaks out. So the bucket holds the most recent
    ``ceil(total_count / ratio)`` values since the last reset. The buffer doubles when it is full and the
    start has not moved by ``ratio`` yet, and otherwise shifts the kept values down, as in statopt.
    """

    def __init__(self, ratio: int, size: int = INITIAL_BUCKET_SIZE) -> None:
        self.ratio = ratio
        self.values: FloatArray = np.zeros(size, dtype=np.float64)
        self.steps: NDArray[np.int64] = np.zeros(size, dtype=np.int64)
        self.count = 0
        self.start = 0
        self.end = 0
        self.total_count = 0

    def reset(self) -> None:
        self.count = self.start = self.end = self.total_count = 0

    def add(self, step: int, value: float) -> None:
        if self.end == self.values.size:
            if self.start < self.ratio:
                self.values = np.concatenate([self.values, np.zeros_like(self.values)])
                self.steps = np.concatenate([self.steps, np.zeros_like(self.steps)])
            else:
                self.values[: self.count] = self.values[self.start : self.end]
                self.steps[: self.count] = self.steps[self.start : self.end]
                self.start, self.end = 0, self.count
        self.values[self.end] = value
        self.steps[self.end] = step
        self.end += 1
        if self.total_count % self.ratio == 0:
            self.count += 1
        else:
            self.start += 1
        self.total_count += 1

    def kept(self) -> FloatArray:
        return self.values[self.start : self.end]

    def kept_steps(self) -> NDArray[np.int64]:
        return self.steps[self.start : self.end]

    def mean_std(self, mode: VarMode) -> tuple[float, float, int, int]:
        """statopt ``mean_std``: (mean, std, dof, batch size) of the kept values."""
        y = self.kept()
        count = self.count
        mean = float(y.mean())
        if mode == "bm":  # batch means: floor(sqrt(count)) values per batch, the incomplete last batch dropped
            b = math.isqrt(count)
            nb = count // b
            batch_means = y[: nb * b].reshape(nb, b).mean(axis=1)
            std = math.sqrt(b / (nb - 1)) * float(np.linalg.norm(batch_means - mean))
            return mean, std, b - 1, b
        if mode == "olbm":  # overlapping batch means: every window of b consecutive values
            b = math.isqrt(count)
            centred = np.concatenate([[0.0], np.add.accumulate(y - mean)])  # centred: no cancellation
            diffs = (centred[b:] - centred[:-b]) / b  # = window means - mean
            ny = diffs.size
            std = math.sqrt(b * count / (ny * (ny - 1))) * float(np.linalg.norm(diffs))
            return mean, std, count - b, b
        return mean, float(y.std(ddof=1)), count - 1, 1  # iid sample standard deviation

    def stats_test(self, significance: float, mode: VarMode, composite: bool) -> TestResult:
        """statopt ``stats_test``: the two-sided t-interval of the mean contains 0 and the two half-means have
        the same sign; in the composite test (before the first drop) each half-mean's interval, of the same
        half-width, must contain 0 instead of the whole mean's."""
        mean, std, dof, batch = self.mean_std(mode)
        t = float(stdtrit(dof, 1.0 - significance / 2.0))
        half_width = std * t / math.sqrt(self.count)
        lower, upper = mean - half_width, mean + half_width
        y = self.kept()
        half = self.count // 2
        mean1, mean2 = float(y[:half].mean()), float(y[half:].mean())
        stationary = (lower < 0 and upper > 0) and (mean1 * mean2 > 0)
        if composite:
            lb1, ub1 = mean1 - half_width, mean1 + half_width
            lb2, ub2 = mean2 - half_width, mean2 + half_width
            stationary = (lb1 * ub1 < 0) and (lb2 * ub2 < 0) and (mean1 * mean2 > 0)
        return TestResult(stationary, mean, half_width, mean1, mean2, std, dof, batch, composite)


class StationarityParams(DetectorParams):
    """statopt ``SASA`` settings, with its defaults except ``var_mode`` (see ``Stationarity``)."""

    warmup: int = Field(default=1000, ge=0, description="No decay before this many points.")
    drop_factor: float = Field(
        default=10.0, gt=1, allow_inf_nan=False, description="A decay divides the LR by this (10: factor 0.1)."
    )
    significance: float = Field(default=0.05, gt=0, lt=1, description="delta: the t-interval is 1 - delta.")
    leak_ratio: int = Field(default=8, ge=1, description="theta: the bucket keeps the newest 1/theta of the values.")
    min_samples: int = Field(default=1000, ge=100, description="minN_stats: test only with more values kept.")
    test_every: int = Field(default=100, ge=1, description="testfreq: test on every this-many-th point.")
    var_mode: VarMode = Field(
        default="bm", description="bm: batch means; olbm: overlapping batch means; iid: sample variance."
    )
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="A decay below this LR is a stop.")


@register
class Stationarity(Detector[StationarityParams]):
    """SASA+ (statopt ``SASA``): decay when the optimizer's iterates have become stationary at this LR.

    The rule (statopt ``SASA.stats_adaptation``; the metric is ``Delta_k`` of the module docstring)::

        each point: n_steps += 1; bucket.add(Delta)                  # leaky bucket, ratio leak_ratio [8]
        if bucket.count > min_samples [1000] and n_steps % test_every [100] == 0:
            mean, std, dof = mean_std(var_mode)                      # batch means [bm]
            hw = std * t_{1 - delta/2, dof} / sqrt(count)            # delta = significance [0.05]
            stationary = (mean - hw < 0 < mean + hw) and mean1 * mean2 > 0     # half-means of the bucket
            before the first decay (composite test):
                stationary = 0 in (mean1 +- hw) and 0 in (mean2 +- hw) and mean1 * mean2 > 0
            if stationary and n_steps > warmup [1000]:
                lr /= drop_factor [10]; bucket.reset(); composite test off

    So no decay comes earlier than about ``min_samples * leak_ratio`` (8000) points after the previous one.

    ``var_mode`` defaults to ``"bm"`` (batch means, the estimator the paper describes). statopt's own default
    is ``'mb'``, which its ``mean_std`` does not recognise, so it silently falls back to the iid sample
    variance (``"iid"`` here): pass ``var_mode="iid"`` to reproduce statopt run with its defaults. statopt
    keeps the bucket in the parameters' dtype (usually float32); this keeps it in float64.

    A decay whose new LR would be below ``min_lr`` (when the LR is known) is a ``stop`` instead, after which
    the detector is quiet. A non-finite ``Delta`` counts as a step but is not put in the bucket (statopt would
    store it and never pass a test again).
    """

    name = "stationarity"
    Params = StationarityParams

    def __init__(self, params: StationarityParams) -> None:
        super().__init__(params)
        self.bucket = LeakyBucket(params.leak_ratio)
        self.n_steps = 0
        self.composite_test = True
        self.stopped = False
        self.decays = 0

    def _update(self, step: int, value: float) -> list[Decision]:
        if self.stopped:
            return []
        p = self.params
        self.n_steps += 1
        if math.isfinite(value):
            self.bucket.add(step, value)
        if not (self.bucket.count > p.min_samples and self.n_steps % p.test_every == 0):
            return []
        if self.n_steps <= p.warmup:
            return []  # statopt runs the test here too but acts on it only after warmup; it has no side effect
        result = self.bucket.stats_test(p.significance, p.var_mode, self.composite_test)
        if not result.stationary:
            return []
        stop = self.lr is not None and self.lr / p.drop_factor < p.min_lr
        evidence = self._evidence(result, stop=stop)
        if stop:
            self.stopped = True
            return [Decision(step=step, action="stop", factor=1.0, lr=self.lr, evidence=evidence)]
        if self.lr is not None:
            self.lr = self.lr / p.drop_factor  # statopt: lr /= drop_factor
        self.composite_test = False
        self.bucket.reset()
        self.decays += 1
        return [Decision(step=step, action="decay", factor=1.0 / p.drop_factor, lr=self.lr, evidence=evidence)]

    def _evidence(self, r: TestResult, *, stop: bool) -> Evidence:
        p = self.params
        b = self.bucket
        steps = b.kept_steps()
        first, last = int(steps[0]), int(steps[-1])
        level = f"{1 - p.significance:.0%}"
        estimator = {"bm": "batch means", "olbm": "overlapping batch means", "iid": "iid"}[p.var_mode]
        if r.composite:
            test = (
                f"zero lies within +-{r.half_width:.3g} of both half-means ({r.mean1:.3g} and {r.mean2:.3g}), "
                "which have the same sign (the stricter test used before the first decay)"
            )
        else:
            test = "zero is inside the interval and both halves of the bucket have means of the same sign"
        tail = (
            f" The next LR would be below min_lr {p.min_lr:g}: training is done."
            if stop
            else " The iterates no longer move on average: this LR has done what it can."
        )
        return Evidence(
            window=(first, last),
            statistic="mean of Delta",
            value=r.mean,
            threshold=0.0,
            explanation=(
                f"The newest {b.count} of {b.total_count} values of Delta since the last reset average "
                f"{r.mean:.3g} +- {r.half_width:.3g} ({level} t-interval, {estimator}): {test}.{tail}"
            ),
            details={
                "half_width": r.half_width,
                "lower": r.mean - r.half_width,
                "upper": r.mean + r.half_width,
                "mean_first_half": r.mean1,
                "mean_second_half": r.mean2,
                "std": r.std,
                "dof": r.dof,
                "batch_size": r.batch,
                "kept": b.count,
                "since_reset": b.total_count,
                "points_seen": self.n_steps,
                "test": "composite" if r.composite else "confidence interval",
                "var_mode": p.var_mode,
                "significance": p.significance,
            },
        )

    # --- state ---------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        b = self.bucket
        return {
            "n_steps": self.n_steps,
            "composite_test": self.composite_test,
            "stopped": self.stopped,
            "decays": self.decays,
            "bucket": {
                "values": b.kept().tolist(),
                "steps": b.kept_steps().tolist(),
                "count": b.count,
                "total_count": b.total_count,
            },
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.n_steps = int(state["n_steps"])
        self.composite_test = bool(state["composite_test"])
        self.stopped = bool(state["stopped"])
        self.decays = int(state["decays"])
        saved = state["bucket"]
        values, steps = saved["values"], saved["steps"]
        count = int(saved["count"])
        if len(values) != count or len(steps) != count:
            raise ValueError("stationarity state: the bucket's values and steps must both hold `count` entries")
        size = max(INITIAL_BUCKET_SIZE, 2 * count)
        bucket = LeakyBucket(self.params.leak_ratio, size)
        bucket.values[:count] = np.asarray(values, dtype=np.float64)
        bucket.steps[:count] = np.asarray(steps, dtype=np.int64)
        bucket.count = bucket.end = count
        bucket.total_count = int(saved["total_count"])
        self.bucket = bucket
