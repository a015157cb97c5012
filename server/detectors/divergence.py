"""Telling a collapse from the end of a stage: the metric went back to chance level, or stopped being a number.

A stage detector looks for a curve that has stopped improving. A run whose loss has climbed back to where an
untrained network starts (2.30 for ten classes), or whose accuracy is back at chance, has also "stopped
improving" -- on the wrong side. Decaying the LR of such a run is not what a person wants to be told; it has
*diverged*, and the right decision is to stop it, with an explanation that says so. :class:`DivergenceGuard`
is that check, shared by the detectors that use it (AutoDecay). It is pure, O(1) per value and its state is a
small JSON dict.

Two rules, each with its statistic and threshold in the evidence:

* **not a number** -- ``nonfinite`` consecutive values that are NaN or infinite. A NaN loss or test loss means
  the weights are NaN: SGD never brings them back.
* **back to chance** -- the metric has given back at least ``share`` of the improvement it had made on its
  chance level, on ``points`` consecutive values (``given back = (value - best) / (chance - best)`` in loss
  terms: 0 at the best value, 1 at chance). The chance level is ``chance`` when the caller knows it (``ln K``
  for a K-class cross-entropy, ``1/K`` for an accuracy); otherwise the first value seen, which for a loss is
  the untrained network's. The rule only arms once the run has improved on that level by ``min_gain`` of its
  magnitude (AutoDecay: half), so neither the first noisy epochs of a run nor a noisy wander back above a
  first value that was low by chance can count as a collapse: only a run that had clearly learned.

The values fed here are already oriented as losses (lower is better) by the caller; ``chance`` is given in
the metric's own orientation and converted the same way.
"""

from __future__ import annotations

import math
from typing import Any

from server.detectors.base import Evidence


class DivergenceGuard:
    """Consecutive-value checks for a NaN/inf metric and for a metric back at chance (see the module doc)."""

    def __init__(self, *, chance: float | None, share: float, points: int, nonfinite: int, min_gain: float) -> None:
        self.chance = chance  # loss orientation; None: the first finite value
        self.share = share
        self.points = points
        self.nonfinite_limit = nonfinite
        self.min_gain = min_gain
        self.reference: float | None = chance
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # consecutive values back at chance
        self.bad_since: int | None = None
        self.nonfinite = 0  # consecutive non-finite values
        self.nonfinite_since: int | None = None

    # --- the checks -------------------------------------------------------------------------------------------

    def non_finite(self, step: int, raw: float) -> Evidence | None:
        """A NaN or infinite value at ``step``; evidence when it is the ``nonfinite``-th in a row."""
        if self.nonfinite == 0:
            self.nonfinite_since = step
        self.nonfinite += 1
        self.bad = 0
        if self.nonfinite < self.nonfinite_limit:
            return None
        what = "NaN" if math.isnan(raw) else "infinite"
        first = self.nonfinite_since if self.nonfinite_since is not None else step
        count = f"{self.nonfinite} values in a row" if self.nonfinite > 1 else "a value"
        return Evidence(
            window=(first, step),
            statistic="consecutive non-finite values",
            value=float(self.nonfinite),
            threshold=float(self.nonfinite_limit),
            explanation=(
                f"Training diverged: the monitored metric is {what} at step {step} ({count} since step {first}; "
                f"the limit is {self.nonfinite_limit}). The weights are no longer numbers and SGD does not "
                "bring them back; this is not the end of a stage: stop training."
            ),
            details={"reason": "diverged", "rule": "non-finite", "last_value": "NaN" if what == "NaN" else "inf"},
        )

    def finite(self, step: int, loss: float, *, sign: float) -> Evidence | None:
        """A finite value (``loss``: oriented so that lower is better; ``sign`` converts it back for the text)."""
        self.nonfinite = 0
        if self.reference is None:
            self.reference = loss
        if self.best is None or loss < self.best:
            self.best, self.best_step = loss, step
        reference, best = self.reference, self.best
        gain = reference - best
        if gain <= 0 or gain < self.min_gain * max(abs(reference), 1e-12):
            self.bad = 0  # has not learned enough yet for a return to chance to mean anything
            return None
        given_back = (loss - best) / gain
        if given_back < self.share:
            self.bad = 0
            return None
        if self.bad == 0:
            self.bad_since = step
        self.bad += 1
        if self.bad < self.points:
            return None
        first = self.bad_since if self.bad_since is not None else step
        level = "chance level" if self.chance is not None else "its starting level"
        return Evidence(
            window=(first, step),
            statistic="share of the improvement on chance given back",
            value=given_back,
            threshold=self.share,
            explanation=(
                f"Training diverged: the monitored metric is {sign * loss:.4g} at step {step}, back to {level} "
                f"({sign * reference:.4g}) after its best {sign * best:.4g} at step {self.best_step}: it gave back "
                f"{given_back:.0%} of its improvement (threshold {self.share:.0%}) on {self.bad} consecutive "
                f"value{'s' if self.bad > 1 else ''} since step {first}. This is a collapse, not the end of a "
                "stage: stop training."
            ),
            details={
                "reason": "diverged",
                "rule": "back to chance",
                "value_now": sign * loss,
                "chance_level": sign * reference,
                "chance_given": "yes" if self.chance is not None else "no (the first value)",
                "best": sign * best,
                "best_step": self.best_step,
                "consecutive": self.bad,
            },
        )

    # --- state ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
            "bad_since": self.bad_since,
            "nonfinite": self.nonfinite,
            "nonfinite_since": self.nonfinite_since,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.bad = state["bad"]
        self.bad_since = state["bad_since"]
        self.nonfinite = state["nonfinite"]
        self.nonfinite_since = state["nonfinite_since"]
