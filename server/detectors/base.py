"""The detector interface: pure, deterministic, fed one point at a time, state saved and restored as JSON.

A detector watches one metric series (say per-step training loss) and decides when the current learning
stage has ended. It has no I/O, no clock and no randomness, so the same points always give the same
decisions: live in the server, in ``stagewatch replay``, in tests and in benchmarks. Its whole state is a
JSON-serialisable dict (``state_dict``), so a server restart that restores it changes no decision.

A detector keeps track of the learning rate its decisions lead to: it starts from ``initial_lr`` and assumes
each decision it returns is applied at that step (the server tells it otherwise through ``set_lr``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["decay", "stop"]


@dataclass(frozen=True)
class Evidence:
    """What a person needs to judge a decision."""

    window: tuple[int, int]  # first and last step of the points the statistic was computed from
    statistic: str  # what was measured, e.g. "P(slope < 0)"
    value: float  # its value
    threshold: float  # what it was compared with
    explanation: str  # one plain sentence
    details: dict[str, float | int | str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["window"] = list(self.window)
        return out


@dataclass(frozen=True)
class Decision:
    """Decay the learning rate by ``factor`` at ``step``, or stop: the last stage has ended."""

    step: int
    action: Action
    factor: float  # the LR is multiplied by this (1.0 for stop)
    lr: float | None  # the learning rate in effect after the decision, when known
    evidence: Evidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "action": self.action,
            "factor": self.factor,
            "lr": self.lr,
            "evidence": self.evidence.to_dict(),
        }


class DetectorParams(BaseModel):
    """Base of every detector's parameters: validated once, unknown names refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_lr: float | None = Field(
        default=None, gt=0, description="Learning rate at the first point; decisions then carry the new LR."
    )


P = TypeVar("P", bound=DetectorParams)


class Detector(ABC, Generic[P]):
    """Base class. Subclasses set ``name`` and ``Params`` and implement ``update`` and the state hooks."""

    name: ClassVar[str]
    Params: ClassVar[type[DetectorParams]]

    def __init__(self, params: P) -> None:
        self.params = params
        self.lr: float | None = params.initial_lr
        self.last_step: int | None = None

    @abstractmethod
    def _update(self, step: int, value: float) -> list[Decision]:
        """Consume one point (steps strictly increase); return the decisions it completes."""

    def update(self, step: int, value: float) -> list[Decision]:
        """Feed one point. Steps must increase; a repeated or older step is a caller bug."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_step}")
        self.last_step = step
        return self._update(step, float(value))

    def set_lr(self, lr: float) -> None:
        """The learning rate actually in effect (after a rejected proposal or an outside schedule change)."""
        self.lr = lr

    def not_applied(self, action: Action) -> None:
        """A decision this detector returned was not applied (rejected, superseded, expired, only observed).

        The base class does nothing: the LR it assumed is corrected by the next ``set_lr``. Detectors that
        count their decisions override it."""

    def _decayed(self, factor: float) -> float | None:
        if self.lr is None:
            return None
        self.lr *= factor
        return self.lr

    # --- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this detector is; JSON-serialisable."""
        return {"lr": self.lr, "last_step": self.last_step, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = state["lr"]
        self.last_step = state["last_step"]
        self._load(state)

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN or infinities; states and evidence carry None instead."""
    return x if math.isfinite(x) else None


def from_json_float(x: float | None, default: float) -> float:
    return default if x is None else x
