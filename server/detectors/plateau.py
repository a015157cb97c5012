"""Plateau: exactly PyTorch's ``ReduceLROnPlateau``, for one parameter group, one point per ``step(metric)``.

Source: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (pytorch/pytorch ``torch/optim/lr_scheduler.py``), same
parameters, same defaults, same arithmetic; ``tests/test_detector_plateau.py`` checks it against the real
scheduler on generated series.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from server.detectors import register
from server.detectors.base import Decision, Detector, DetectorParams, Evidence, finite_or_none


class PlateauParams(DetectorParams):
    """The arguments of ``torch.optim.lr_scheduler.ReduceLROnPlateau``, with its defaults."""

    mode: Literal["min", "max"] = Field(default="min", description="min: the metric should fall; max: rise.")
    factor: float = Field(default=0.1, gt=0, lt=1, description="new_lr = lr * factor.")
    patience: int = Field(default=10, ge=0, description="Points without improvement tolerated; one more decays.")
    threshold: float = Field(default=1e-4, ge=0, allow_inf_nan=False, description="Least improvement that counts.")
    threshold_mode: Literal["rel", "abs"] = Field(
        default="rel", description="rel: best * (1 -/+ threshold); abs: best -/+ threshold."
    )
    cooldown: int = Field(default=0, ge=0, description="Points after a decay during which bad points are ignored.")
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="Lower bound of the learning rate.")
    eps: float = Field(default=1e-8, ge=0, allow_inf_nan=False, description="A smaller LR change is not applied.")


def _encode(x: float) -> float | str:
    """JSON has no infinities; ``best`` may be one (the initial +-inf, or a -inf/+inf metric), so keep it as text."""
    return x if math.isfinite(x) else repr(x)


def _decode(x: float | str) -> float:
    return float(x)


@register
class Plateau(Detector[PlateauParams]):
    """PyTorch ``ReduceLROnPlateau`` for one param group: each ``update`` is one ``scheduler.step(value)``.

    The exact rule (torch ``lr_scheduler.py``)::

        is_better(a, best): min/rel: a < best * (1 - threshold)   min/abs: a < best - threshold
                            max/rel: a > best * (1 + threshold)   max/abs: a > best + threshold
        step(a): if is_better(a, best): best = a; bad = 0  else: bad += 1
                 if cooldown_counter > 0: cooldown_counter -= 1; bad = 0
                 if bad > patience:                      # strictly greater: the (patience+1)-th bad point
                     new = max(lr * factor, min_lr)
                     if lr - new > eps: lr = new         # else no change (and no decision here)
                     cooldown_counter = cooldown; bad = 0

    ``best`` starts at +inf (min) or -inf (max). A NaN is never better than ``best`` (every comparison with
    NaN is false), so it counts as a bad point, as in torch.

    A decision is returned exactly when torch would change the LR: ``factor`` is ``new_lr / old_lr`` (so a
    clamp at ``min_lr`` shows as a factor above ``params.factor``) and ``lr`` is the new LR. When
    ``initial_lr`` is not given, the LR is unknown: the detector then runs the rule on a *relative* LR that
    starts at 1.0 (so ``min_lr`` and ``eps`` are understood relative to the initial LR) and reports
    ``lr=None``. A ``set_lr`` from the server makes the LR known from then on.
    """

    name = "plateau"
    Params = PlateauParams

    def __init__(self, params: PlateauParams) -> None:
        super().__init__(params)
        self.best = math.inf if params.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.best_step: int | None = None  # step of the point that set ``best``
        self.first_step: int | None = None
        self.relative_lr = 1.0  # the LR relative to the initial one, used while ``self.lr`` is unknown
        # torch's rel_epsilon: 1 - threshold (min) or threshold + 1 (max), computed the same way.
        self._rel_epsilon = 1.0 - params.threshold if params.mode == "min" else params.threshold + 1.0

    def _is_better(self, a: float, best: float) -> bool:
        # Same expressions, in the same order, as torch's _is_better: exact float agreement.
        p = self.params
        if p.threshold_mode == "rel":
            return a < best * self._rel_epsilon if p.mode == "min" else a > best * self._rel_epsilon
        return a < best - p.threshold if p.mode == "min" else a > best + p.threshold

    def _update(self, step: int, value: float) -> list[Decision]:
        p = self.params
        if self.first_step is None:
            self.first_step = step
        if self._is_better(value, self.best):
            self.best = value
            self.best_step = step
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad points are ignored during cooldown
        if self.num_bad_epochs <= p.patience:
            return []
        bad = self.num_bad_epochs
        self.cooldown_counter = p.cooldown
        self.num_bad_epochs = 0
        old_lr = self.lr if self.lr is not None else self.relative_lr
        new_lr = max(old_lr * p.factor, p.min_lr)
        if not old_lr - new_lr > p.eps:
            return []  # torch leaves the LR as it is (at min_lr, or a negligible change); counters still reset
        if self.lr is not None:
            self.lr = new_lr
        else:
            self.relative_lr = new_lr
        return [
            Decision(step=step, action="decay", factor=new_lr / old_lr, lr=self.lr, evidence=self._evidence(step, bad))
        ]

    def _evidence(self, step: int, bad: int) -> Evidence:
        p = self.params
        start = self.best_step if self.best_step is not None else self.first_step
        assert start is not None
        if p.threshold_mode == "rel":
            margin = f"threshold rel {p.threshold:g}"
        else:
            margin = f"threshold abs {p.threshold:g}"
        word = "evaluation" if bad == 1 else "evaluations"
        best = f"{self.best:.6g}" if self.best_step is not None else "(none yet: no point improved on the start)"
        return Evidence(
            window=(start, step),
            statistic="epochs without improvement",
            value=float(bad),
            threshold=float(p.patience),
            explanation=(
                f"No improvement over the best {best} ({margin}, mode {p.mode}) for {bad} {word}, "
                f"more than the patience of {p.patience}."
            ),
            details={
                "best": finite_or_none(self.best),
                "best_step": self.best_step,
                "mode": p.mode,
                "threshold_mode": p.threshold_mode,
                "threshold": p.threshold,
                "cooldown": p.cooldown,
                "min_lr": p.min_lr,
                "lr_known": "yes" if self.lr is not None else "no (relative to an initial LR of 1.0)",
            },
        )

    # --- state ---------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "best": _encode(self.best),
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "best_step": self.best_step,
            "first_step": self.first_step,
            "relative_lr": self.relative_lr,
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.best = _decode(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.best_step = state["best_step"]
        self.first_step = state["first_step"]
        self.relative_lr = float(state["relative_lr"])
