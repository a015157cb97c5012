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

Stage checkpoints and rollback (``model=`` and ``checkpoint_dir=``, or your own ``save_checkpoint`` /
``load_checkpoint``):

- Just before it applies a ``decay`` or ``set_lr`` -- the end of a stage -- rank 0 saves a checkpoint
  (``model``, ``optimizer``, ``scheduler`` and this applier's state, saved with ``torch.save`` atomically to
  ``checkpoint_dir/stage-end-step<step>.pt``; or whatever ``save_checkpoint(StageEnd)`` does, returning a path or
  URI) and reports it with the command's acknowledgement: the server lists it (``GET /runs/{id}/checkpoints``)
  with the stage it ends and the metrics logged by then. An earlier-stage model is the one to transfer.
- ``rollback`` (``POST /runs/{id}/rollback``): every rank loads the checkpoint at the same step boundary
  (``load_checkpoint(uri)``, or the default loader: model, optimizer and scheduler state, so parameters and LR
  are exactly the saved ones), and :attr:`CommandApplier.rewound_to` tells the loop the step it now stands at:
  the next step it runs is ``rewound_to + 1``. Rank 0 first makes sure the server has every point logged so far
  (``run.flush``; if it cannot within ``rollback_flush_s`` the rollback waits and is tried again at the first
  step ``rollback_retry_s`` later), then the run is
  rewound to the checkpoint's step and the rollback acknowledged, before anything logged afterwards is sent: the
  steps after it are logged afresh, the old ones are in the audit log. The data loader is not rewound: the loop
  decides which batches follow.

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
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainer.commands import Command

__all__ = ["AppliedCommand", "CommandApplier", "CommandSource", "LoadHook", "SaveHook", "StageEnd"]

logger = logging.getLogger("trainer")


class CommandSource(Protocol):
    """What the applier needs of a run (``trainer.Run`` is one)."""

    should_stop: bool

    def pending_commands(self) -> list[Command]: ...

    def ack_command(self, command_id: int, *, status: str, step: int, lr: float | None, message: str = "") -> None: ...


@dataclasses.dataclass(frozen=True)
class AppliedCommand:
    """A command as this job handled it: ``status`` ``"applied"`` or ``"failed"`` at ``step``, ``lr`` after
    (``checkpoint``: the stage checkpoint saved just before it, as reported)."""

    id: int
    action: str
    status: str
    step: int
    lr: float | None
    message: str = ""
    checkpoint: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class StageEnd:
    """What a ``save_checkpoint`` hook is told: the stage ends at ``step`` (LR ``lr``), just before ``command``."""

    step: int
    lr: float
    command: Command
    applier: CommandApplier


SaveHook = Callable[[StageEnd], str]  # saves, returns the path or URI
LoadHook = Callable[[str], None]  # loads the checkpoint at that path or URI into the model, optimizer, scheduler


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
        model: nn.Module | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        save_checkpoint: SaveHook | None = None,
        load_checkpoint: LoadHook | None = None,
        rollback_flush_s: float = 10.0,
        rollback_retry_s: float = 30.0,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if (checkpoint_dir is not None or (save_checkpoint is None) != (load_checkpoint is None)) and model is None:
            missing = "save_checkpoint" if save_checkpoint is None else "load_checkpoint"
            raise ValueError(f"the default stage checkpoints need model= (or pass {missing} as well)")
        self.run = run
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sync_every = sync_every
        self.model = model
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._save_hook = save_checkpoint
        self._load_hook = load_checkpoint
        self.rollback_flush_s = rollback_flush_s
        self.rollback_retry_s = rollback_retry_s
        self.should_stop = False
        self.applied: dict[int, AppliedCommand] = {}
        # After a rollback applied by the last step(): the step the job stands at now (the loop's next is +1).
        self.rewound_to: int | None = None
        self._rollback_not_before = -math.inf  # monotonic time: the next try after the server could not be flushed

    @property
    def saves_checkpoints(self) -> bool:
        """Whether a stage checkpoint is saved before each decay or LR change (and a rollback can load one)."""
        return self.checkpoint_dir is not None or self._save_hook is not None

    # --- the training loop's side ---------------------------------------------------------------------------

    def step(self, step: int) -> list[AppliedCommand]:
        """Call once per training step, after ``optimizer.step()`` and ``scheduler.step()``, with the same
        ``step`` on every rank. Returns the commands applied now (the same list on every rank)."""
        self.rewound_to = None
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
            todo = self._ready(todo)
        if distributed:
            box: list[Any] = [[dataclasses.asdict(c) for c in todo] if leader else None]
            dist.broadcast_object_list(box, src=0)
            todo = [Command(**c) for c in box[0]]
        results: list[AppliedCommand] = []
        for command in todo:
            results.append(self._apply(command, step))
            if leader:
                self._ack(results[-1], fresh=True)
            if self.rewound_to is not None:
                step = self.rewound_to  # what follows a rollback applies at the step the job now stands at
        return results

    def _ready(self, todo: list[Command]) -> list[Command]:
        """The commands to apply now (rank 0 decides, before the broadcast): all of them, unless a rollback is
        among them and the server does not have every point logged so far yet (they would land after the rewind
        and count as the new trajectory's); then only those before it, and the rollback is tried again later."""
        for i, command in enumerate(todo):
            if command.action != "rollback":
                continue
            flush: Callable[[float], bool] | None = getattr(self.run, "flush", None)
            if time.monotonic() < self._rollback_not_before:
                return todo[:i]  # the last try failed a moment ago: training goes on meanwhile
            if flush is None or flush(self.rollback_flush_s):
                return todo
            self._rollback_not_before = time.monotonic() + self.rollback_retry_s
            logger.warning("stagewatch: rollback %s waits until the server has every point logged", command.id)
            return todo[:i]
        return todo

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

    def _ack(self, done: AppliedCommand, *, fresh: bool = False) -> None:
        """Queues the acknowledgement; ``fresh``: of a command applied just now (not re-acknowledged after a
        resume: a rollback's rewind must not be made again over what the job has logged since)."""
        assert self.run is not None
        try:
            ack_rollback = getattr(self.run, "ack_rollback", None)
            if fresh and done.action == "rollback" and done.status == "applied" and ack_rollback is not None:
                timeout = self.rollback_flush_s
                if not ack_rollback(done.id, step=done.step, lr=done.lr, message=done.message, timeout=timeout):
                    logger.warning("stagewatch: the rollback's rewind is not on the server yet; it goes first")
            elif done.checkpoint is not None:
                self.run.ack_command(
                    done.id,
                    status=done.status,
                    step=done.step,
                    lr=done.lr,
                    message=done.message,
                    checkpoint=done.checkpoint,  # type: ignore[call-arg]  # trainer.Run takes it; see _save
                )
            else:
                self.run.ack_command(done.id, status=done.status, step=done.step, lr=done.lr, message=done.message)
        except Exception:  # a closed run, say: the training loop goes on; the ack is re-sent after a resume
            logger.exception("stagewatch: could not queue the acknowledgement of command %s", done.id)

    def _apply(self, command: Command, step: int) -> AppliedCommand:
        status, message = "applied", ""
        action = command.action
        checkpoint: dict[str, Any] | None = None
        if action == "decay":
            factor = command.factor
            if factor is None or not 0 < factor < 1:
                status, message = "failed", f"decay needs a factor in (0, 1), got {factor!r}"
            else:
                checkpoint = self._save(command, step)
                self._change_lr(lambda lr: lr * factor)
                message = f"lr x {factor:g}"
        elif action == "set_lr":
            new = command.lr
            if new is None or not (new > 0 and math.isfinite(new)):
                status, message = "failed", f"set_lr needs a finite lr > 0, got {new!r}"
            else:
                checkpoint = self._save(command, step)
                self._change_lr(lambda _lr: new)
                message = f"lr = {new:g}"
        elif action == "rollback":
            status, message, at = self._rollback(command)
            if status == "applied":
                step = at  # acknowledged where the job now stands: the checkpoint's step
        elif action == "stop":
            self.should_stop = True
            if self.run is not None:
                self.run.should_stop = True
            message = "stop requested"
        else:
            status, message = "failed", f"unknown action {action!r}"
        done = AppliedCommand(command.id, action, status, step, self.current_lr(), message, checkpoint)
        self.applied[command.id] = done
        if status == "applied":
            logger.info("stagewatch: applied command %s (%s) at step %s: %s", command.id, action, step, message)
        else:
            logger.warning("stagewatch: command %s failed at step %s: %s", command.id, step, message)
        return done

    def _save(self, command: Command, step: int) -> dict[str, Any] | None:
        """The stage checkpoint before ``command`` changes the LR, saved on rank 0; the fields to report (None on
        other ranks, without checkpoints, or when saving failed: training goes on without it)."""
        if not self.saves_checkpoints or (_distributed() and dist.get_rank() != 0):
            return None
        lr = self.current_lr()
        try:
            if self._save_hook is not None:
                uri = str(self._save_hook(StageEnd(step, lr, command, self)))
            else:
                uri = self._save_default(step)
        except Exception:
            logger.exception("stagewatch: could not save the stage checkpoint at step %s", step)
            return None
        logger.info("stagewatch: stage checkpoint at step %s: %s", step, uri)
        return {"step": step, "uri": uri, "lr": lr, "decision_id": command.id}

    def _save_default(self, step: int) -> str:
        assert self.checkpoint_dir is not None and self.model is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = (self.checkpoint_dir / f"stage-end-step{step}.pt").resolve()
        state = {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stagewatch": self.state_dict(),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash never leaves half a checkpoint under the reported name
        return str(path)

    def _rollback(self, command: Command) -> tuple[str, str, int]:
        """Loads the rollback's checkpoint on this rank: (status, message, the step the job now stands at)."""
        target: Mapping[str, Any] | None = command.checkpoint
        if target is None:
            return "failed", "a rollback needs a checkpoint", 0
        step, uri = int(target["step"]), str(target["uri"])
        if self._load_hook is None and self.model is None:
            return "failed", "this job cannot load checkpoints (CommandApplier has no model= or load_checkpoint=)", 0
        try:
            if self._load_hook is not None:
                self._load_hook(uri)
            else:
                self._load_default(uri)
        except Exception as exc:
            logger.exception("stagewatch: could not load the checkpoint %s for rollback %s", uri, command.id)
            return "failed", f"could not load {uri}: {type(exc).__name__}: {exc}"[:2000], 0
        self.rewound_to = step
        return "applied", f"loaded checkpoint {target.get('id')} ({uri}); back at step {step}", step

    def _load_default(self, uri: str) -> None:
        assert self.model is not None
        state = torch.load(uri, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        # The applier's own record stays this job's: it is a superset of the checkpoint's (what was applied after
        # the checkpoint is acknowledged, and the server marks it rolled back; it is never delivered again).

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
