"""Apply Stagewatch commands to a PyTorch optimizer and LR scheduler, once, at a step boundary, on every rank.

The client itself (:mod:`trainer.run`) never imports ``torch``; this module and the integrations do.

```python
applier = CommandApplier(run, optimizer, scheduler)  # run=None on ranks other than 0
for step in range(start, steps):
    loss = train_step()
    optimizer.step()
    scheduler.step()
    applier.step(step)  # applies what the server sent, acknowledges it
    if applier.should_stop:
        break
# checkpoint: {"optimizer": ..., "scheduler": ..., "stagewatch": applier.state_dict()}
```

What a command changes:

- ``decay``: every param group's ``lr`` times ``factor``; ``set_lr``: every param group's ``lr`` set to ``lr``;
  ``stop``: ``should_stop`` (and ``run.should_stop``) becomes ``True``; the loop decides how to stop.
- The scheduler is patched too, so that its next ``step()`` -- and a scheduler rebuilt from a checkpoint --
  keeps the new LR instead of silently undoing it. For an ``LRScheduler`` (``StepLR``, ``LambdaLR``,
  ``CosineAnnealingLR``, ...) each group's ``base_lrs`` entry and the group's ``initial_lr`` are scaled by the
  same factor as the group's LR, and ``_last_lr`` is set to the new LRs; ``OneCycleLR``'s ``max_lr`` /
  ``min_lr`` group entries and ``CyclicLR``'s ``max_lrs`` are scaled as well; ``SequentialLR`` and
  ``ChainedScheduler`` are patched through their child schedulers. ``ReduceLROnPlateau`` reads the LR from
  the param groups each time, so only the groups (and its ``_last_lr``) change; its ``min_lrs`` do not.
- The ids of applied commands are in :meth:`CommandApplier.state_dict`. Save it in the checkpoint next to
  the optimizer and scheduler and load it on resume: a command the job applied before the checkpoint is not
  applied again, even if the server delivers it again (it is only re-acknowledged, with the original step
  and LR). Limit: a job resumed from a checkpoint *older* than a command it applied and acknowledged does not
  get that command again (the server only re-sends unacknowledged commands).

Distributed (``torch.distributed`` initialized, world size > 1): only rank 0 reads the run's commands; every
``sync_every`` steps (those with ``step % sync_every == 0``) rank 0 broadcasts the commands to apply with
``dist.broadcast_object_list`` and every rank applies the same ones at the same step. Every rank must call
``step()`` with the same step numbers. The cost is one small collective (two broadcasts: size, then
payload) per synchronised step -- tens of microseconds on NCCL/gloo within a node, more across nodes; raise
``sync_every`` to pay it less often at the price of applying a command up to ``sync_every - 1`` steps later.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainer.commands import Command

__all__ = ["AppliedCommand", "CommandApplier", "CommandSource"]

logger = logging.getLogger("trainer")


class CommandSource(Protocol):
    """What the applier needs of a run (``trainer.Run`` is one)."""

    should_stop: bool

    def pending_commands(self) -> list[Command]: ...

    def ack_command(self, command_id: int, *, status: str, step: int, lr: float | None, message: str = "") -> None: ...


@dataclasses.dataclass(frozen=True)
class AppliedCommand:
    """A command as this job handled it: ``status`` ``"applied"`` or ``"failed"`` at ``step``, ``lr`` after."""

    id: int
    action: str
    status: str
    step: int
    lr: float | None
    message: str = ""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CommandApplier:
    """Applies commands from ``run`` to ``optimizer`` (and ``scheduler``) exactly once; see the module doc."""

    def __init__(
        self,
        run: CommandSource | None,
        optimizer: Optimizer,
        scheduler: LRScheduler | ReduceLROnPlateau | None = None,
        *,
        sync_every: int = 1,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.run = run
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sync_every = sync_every
        self.should_stop = False
        self.applied: dict[int, AppliedCommand] = {}

    # --- the training loop's side ---------------------------------------------------------------------------

    def step(self, step: int) -> list[AppliedCommand]:
        """Call once per training step, after ``optimizer.step()`` and ``scheduler.step()``, with the same
        ``step`` on every rank. Returns the commands applied now (the same list on every rank)."""
        distributed = _distributed()
        if distributed and step % self.sync_every != 0:
            return []
        leader = not distributed or dist.get_rank() == 0
        todo: list[Command] = []
        if leader and self.run is not None:
            for command in self.run.pending_commands():
                done = self.applied.get(command.id)
                if done is None:
                    todo.append(command)
                else:  # applied before a checkpoint we resumed from: acknowledge again, never re-apply
                    self._ack(done)
        if distributed:
            box: list[Any] = [[dataclasses.asdict(c) for c in todo] if leader else None]
            dist.broadcast_object_list(box, src=0)
            todo = [Command(**c) for c in box[0]]
        results = [self._apply(command, step) for command in todo]
        if leader:
            for result in results:
                self._ack(result)
        return results

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": [dataclasses.asdict(a) for a in sorted(self.applied.values(), key=lambda a: a.id)],
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = {int(a["id"]): AppliedCommand(**a) for a in state.get("applied", [])}
        self.should_stop = bool(state.get("should_stop", False))
        if self.should_stop and self.run is not None:
            self.run.should_stop = True

    # --- internals ------------------------------------------------------------------------------------------

    def _ack(self, done: AppliedCommand) -> None:
        assert self.run is not None
        try:
            self.run.ack_command(done.id, status=done.status, step=done.step, lr=done.lr, message=done.message)
        except Exception:  # a closed run, say: the training loop goes on; the ack is re-sent after a resume
            logger.exception("stagewatch: could not queue the acknowledgement of command %s", done.id)

    def _apply(self, command: Command, step: int) -> AppliedCommand:
        status, message = "applied", ""
        action = command.action
        if action == "decay":
            factor = command.factor
            if factor is None or not 0 < factor < 1:
                status, message = "failed", f"decay needs a factor in (0, 1), got {factor!r}"
            else:
                self._change_lr(lambda lr: lr * factor)
                message = f"lr x {factor:g}"
        elif action == "set_lr":
            new = command.lr
            if new is None or not (new > 0 and math.isfinite(new)):
                status, message = "failed", f"set_lr needs a finite lr > 0, got {new!r}"
            else:
                self._change_lr(lambda _lr: new)
                message = f"lr = {new:g}"
        elif action == "stop":
            self.should_stop = True
            if self.run is not None:
                self.run.should_stop = True
            message = "stop requested"
        else:
            status, message = "failed", f"unknown action {action!r}"
        done = AppliedCommand(command.id, action, status, step, self.current_lr(), message)
        self.applied[command.id] = done
        if status == "applied":
            logger.info("stagewatch: applied command %s (%s) at step %s: %s", command.id, action, step, message)
        else:
            logger.warning("stagewatch: command %s failed at step %s: %s", command.id, step, message)
        return done

    def _change_lr(self, new_lr: Any) -> None:
        factors: list[float] = []
        for group in self.optimizer.param_groups:
            old = float(group["lr"])
            new = float(new_lr(old))
            group["lr"] = new
            factors.append(new / old if old > 0 else math.nan)
        if self.scheduler is None:
            return
        news = [float(g["lr"]) for g in self.optimizer.param_groups]
        _patch_scheduler(self.scheduler, factors, news)
        if isinstance(self.scheduler, ReduceLROnPlateau):
            return
        for group, factor, new in zip(self.optimizer.param_groups, factors, news, strict=True):
            for key in ("initial_lr", "max_lr", "min_lr"):  # LRScheduler's start value; OneCycleLR's bounds
                if isinstance(group.get(key), (int, float)):
                    group[key] = new if math.isnan(factor) else group[key] * factor


def _scale(values: list[Any], factors: list[float], news: list[float]) -> list[Any]:
    """Each value times its group's factor (or the group's new LR where the old one was 0)."""
    out: list[Any] = []
    for value, factor, new in zip(values, factors, news, strict=False):
        scaled = new if math.isnan(factor) else value * factor
        out.append(torch.tensor(scaled) if isinstance(value, torch.Tensor) else float(scaled))
    return out


def _patch_scheduler(scheduler: LRScheduler | ReduceLROnPlateau, factors: list[float], news: list[float]) -> None:
    children = getattr(scheduler, "_schedulers", None)
    if children is not None:  # SequentialLR, ChainedScheduler
        for child in children:
            _patch_scheduler(child, factors, news)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = list(news)
    if isinstance(scheduler, ReduceLROnPlateau):
        return
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = _scale(list(scheduler.base_lrs), factors, news)
    if hasattr(scheduler, "max_lrs"):  # CyclicLR
        scheduler.max_lrs = _scale(list(scheduler.max_lrs), factors, news)
