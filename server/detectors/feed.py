"""The one loop that feeds a detector. Live detection, ``stagewatch replay``, the detection benchmark and the
tests all call :class:`Feeder`, so what was measured offline is what runs live.

The rules, point by point in step order:

1. **The logged LR.** Before each monitored point, every LR point logged at or before its step is read; each
   change of the logged value is told to the detector (``set_lr``), the first one included. The detector is
   never told the LR it *assumed* after its own decision: only what the job logged.
2. **Holds.** A point inside a hold (``hold_until_step`` / ``hold_until_epoch``, set by an operator or by a
   rejection's backoff) is consumed without being fed.
3. **Decisions.** What becomes of a decision the detector makes is the feeder's ``outcome``:

   - ``"applied"``: it is taken as applied at its step (the detector's own assumption): feeding goes on.
     What an offline replay of a plain recording means by "what would it have decided".
   - ``"observed"``: it is only noted: the detector is told at once that it was not applied
     (``not_applied``) and its LR is set back to the logged one. Observe mode.
   - ``"wait"``: the decision waits for its outcome (approve and auto modes): **nothing more is fed** until
     :meth:`Feeder.resolve` says what happened, so that no decision is ever computed on the premise that a
     waiting one was applied. Resolved *applied at step X*, the points up to X -- trained at the old LR after
     the stage had ended -- are skipped and the new stage starts with the first point after X; resolved *not
     applied* (rejected, expired, superseded, failed), the detector is told (``not_applied``: its stage starts
     again) and the points that arrived meanwhile are fed.
   - ``"logged"``: like ``"wait"``, resolved from the logged LR alone: applied at the step before the logged
     LR next changes. Replays a live auto-mode run, whose applied decisions show in the logged LR.

The whole position is a JSON dict (:meth:`FeedState.to_dict`), stored next to the detector's own state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from server.detectors.base import Decision, Detector

__all__ = ["FeedState", "Feeder", "Outcome"]

Outcome = Literal["applied", "observed", "wait", "logged"]


@dataclasses.dataclass
class FeedState:
    """Where a feeder is: JSON-serialisable, restored exactly."""

    last_step: int | None = None  # the last monitored point consumed (fed, held or skipped)
    lr: float | None = None  # the last logged LR told to the detector
    waiting: dict[str, Any] | None = None  # {"step", "action", "id"?}: a decision whose outcome is not known
    skip_through: int | None = None  # after an applied decision: points up to here are not fed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeedState:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


class Feeder:
    """Feeds ``detector`` by the rules of the module doc."""

    def __init__(self, detector: Detector[Any], state: FeedState | None = None, *, outcome: Outcome = "applied"):
        self.detector = detector
        self.state = state if state is not None else FeedState()
        self.outcome: Outcome = outcome

    @property
    def waiting(self) -> bool:
        return self.state.waiting is not None

    def feed(
        self,
        points: Iterable[tuple[int, float | None, float | None]],
        lrs: Sequence[tuple[int, float | None]] = (),
        *,
        hold_until_step: int | None = None,
        hold_until_epoch: float | None = None,
    ) -> list[Decision]:
        """Consumes ``points`` -- ``(step, value, epoch)`` after ``state.last_step``, in step order; a value of
        ``None`` is NaN -- with ``lrs``, the logged LR points ``(step, value)`` in step order from after the
        last one already read. Returns the decisions made. With outcome ``"wait"`` it stops at the first
        decision (the rest of ``points`` is left unconsumed: feed them again after :meth:`resolve`)."""
        state, detector = self.state, self.detector
        made: list[Decision] = []
        i = 0
        for step, value, epoch in points:
            if self.outcome == "logged" and state.waiting is not None:
                # Applied where the logged LR changes: look ahead at this point's LRs before anything else.
                changed = next((s for s, v in lrs[i:] if s <= step and self._lr_change(v)), None)
                if changed is None:
                    state.last_step = step
                    continue
                self.resolve(applied=True, at_step=changed - 1)
            if state.waiting is not None:
                break
            while i < len(lrs) and lrs[i][0] <= step:
                lr = lrs[i][1]
                if self._lr_change(lr):
                    assert lr is not None
                    state.lr = lr
                    detector.set_lr(lr)
                i += 1
            state.last_step = step
            if state.skip_through is not None:
                if step <= state.skip_through:
                    continue
                state.skip_through = None
            if hold_until_step is not None and step < hold_until_step:
                continue
            if hold_until_epoch is not None and epoch is not None and epoch < hold_until_epoch:
                continue
            decisions = detector.update(step, math.nan if value is None else value)
            if not decisions:
                continue
            made += decisions
            last = decisions[-1]
            if self.outcome == "observed":
                for decision in decisions:
                    self._not_applied(decision.action)
            elif self.outcome in ("wait", "logged"):
                state.waiting = {"step": last.step, "action": last.action}
        return made

    def resolve(self, *, applied: bool, at_step: int | None = None) -> None:
        """The outcome of the waiting decision: applied at ``at_step`` (the step the worker acknowledged), or
        not applied at all."""
        waiting = self.state.waiting
        if waiting is None:
            return
        self.state.waiting = None
        if applied:
            self.state.skip_through = max(int(waiting["step"]), at_step if at_step is not None else -1)
        else:
            self._not_applied(str(waiting["action"]))

    def _lr_change(self, lr: float | None) -> bool:
        return lr is not None and math.isfinite(lr) and lr != self.state.lr

    def _not_applied(self, action: str) -> None:
        self.detector.not_applied(action)  # type: ignore[arg-type]
        if self.state.lr is not None and self.detector.lr != self.state.lr:
            self.detector.set_lr(self.state.lr)  # the LR it assumed never came: the logged one is in effect
