"""Stagewatch in a plain PyTorch loop: one hook on the optimizer, two added lines.

```python
from trainer.integrations.pytorch import StagewatchHook

hook = StagewatchHook(run, optimizer, scheduler, steps_per_epoch=len(loader))
for epoch in range(epochs):
    for x, y in loader:
        loss = loss_fn(model(x), y)
        hook.record(loss)  # a tensor is fine: no GPU sync here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # the hook runs here: counts, logs, applies the server's commands
        scheduler.step()
        if hook.should_stop:
            break
```

The hook is registered with ``optimizer.register_step_post_hook``, so it runs at the end of every
``optimizer.step()`` (a step a ``GradScaler`` skips is not counted). There it:

1. counts the step: ``hook.step`` is the number of optimizer steps done, so the first one is step 1;
2. applies the server's commands through :class:`trainer.torch.CommandApplier` and acknowledges them at that step,
   with the LR now in effect;
3. every ``log_every`` steps, and at the step a ``stop`` command is applied, logs ``lr`` -- the LR of the first
   param group *this* update used, before any command -- and the mean of every value passed to
   :meth:`StagewatchHook.record` since the last logged step (tensors are summed on their device and converted
   with one sync per logged step, not per step).

Commands are applied before the loop's ``scheduler.step()``. That is safe: the applier patches the scheduler too
(``base_lrs``, ``initial_lr``, ``_last_lr``...), so a closed-form schedule (``LambdaLR``, ``OneCycleLR``) goes on
from the decayed LR and a chainable one (``StepLR``, ``ExponentialLR``) from the decayed param groups. A decay
acknowledged at step ``N`` is therefore in the ``lr`` logged from step ``N + 1`` on.

Call :meth:`StagewatchHook.record` before ``optimizer.step()``, as above: what is recorded is logged with the
next step that completes, so the loss of the batch that step ``N`` trained on is logged at step ``N``.

Stage checkpoints and rollback: pass ``model=`` and ``checkpoint_dir=`` (or ``save_checkpoint=`` /
``load_checkpoint=``, see :class:`trainer.torch.CommandApplier`). A checkpoint is saved before each decay the server
sends; a ``rollback`` command loads one inside ``optimizer.step()``, and ``hook.step`` goes back to its step (the
step that loaded it is not logged; your data loader goes on where it was).
"""

from __future__ import annotations

import numbers
import os
import types
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.hooks import RemovableHandle

from trainer.run import Run
from trainer.torch import CommandApplier, LoadHook, SaveHook

__all__ = ["StagewatchHook"]


class StagewatchHook:
    """Applies the server's commands at every ``optimizer.step()`` and logs the LR and recorded values at every
    ``log_every``-th one; see the module doc.

    ``run`` may be ``None`` (under ``torch.distributed``: on every rank but 0, like ``CommandApplier``; every rank
    needs the hook, since the commands are broadcast at the step boundary). ``steps_per_epoch`` makes the logged
    ``epoch`` the fraction of epochs done (``step / steps_per_epoch``); without it no epoch is sent. ``start_step``
    is the number of optimizer steps already done (a resumed job that does not use :meth:`load_state_dict`).
    """

    def __init__(
        self,
        run: Run | None,
        optimizer: Optimizer,
        scheduler: LRScheduler | ReduceLROnPlateau | None = None,
        *,
        log_every: int = 1,
        lr_key: str = "lr",
        steps_per_epoch: int | None = None,
        start_step: int = 0,
        sync_every: int = 1,
        model: nn.Module | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        save_checkpoint: SaveHook | None = None,
        load_checkpoint: LoadHook | None = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.run = run
        self.optimizer = optimizer
        self.applier = CommandApplier(
            run,
            optimizer,
            scheduler,
            sync_every=sync_every,
            model=model,
            checkpoint_dir=checkpoint_dir,
            save_checkpoint=save_checkpoint,
            load_checkpoint=load_checkpoint,
        )
        self.log_every = log_every
        self.lr_key = lr_key
        self.steps_per_epoch = steps_per_epoch
        self.step = start_step
        # Running sums since the last logged step; tensors stay on their device until then.
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}
        self._handle: RemovableHandle | None = optimizer.register_step_post_hook(self._after_step)

    # --- the training loop's side ---------------------------------------------------------------------------

    def record(self, loss: torch.Tensor | float | None = None, /, **values: torch.Tensor | float) -> None:
        """Adds values to log with the next logged step: ``hook.record(loss)`` logs ``loss``,
        ``hook.record(loss, acc=acc)`` both. Each key is logged as the mean of what was recorded since the last
        logged step. Tensors (one element) are detached and stay where they are: no GPU sync here."""
        if loss is not None:
            values = {"loss": loss, **values}
        for key, value in values.items():
            if key == self.lr_key:
                raise ValueError(f"{key!r} is logged by the hook itself (lr_key); record it under another name")
            item: torch.Tensor | float
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{key!r}: expected a one-element tensor, got shape {tuple(value.shape)}")
                item = value.detach().float()  # float32 sums: a bf16 running sum would lose precision
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{key!r}: expected a real number or a tensor, got {type(value).__name__}")
            else:
                item = float(value)
            total = self._sums.get(key)
            self._sums[key] = item if total is None else total + item
            self._counts[key] = self._counts.get(key, 0) + 1

    @property
    def should_stop(self) -> bool:
        """``True`` once a ``stop`` command has been applied; the loop decides how to stop."""
        return self.applier.should_stop

    def current_lr(self) -> float:
        """The LR of the first param group now."""
        return self.applier.current_lr()

    def remove(self) -> None:
        """Detaches the hook from the optimizer; later steps are neither counted nor logged. Idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> StagewatchHook:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.remove()

    # --- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step count and the commands applied so far; save it next to the optimizer and scheduler.

        Call it when you save the checkpoint: it also makes every point logged so far survive a crash
        (:meth:`trainer.run.Run.checkpoint`), so a job resumed from this checkpoint -- ``start_run(...,
        resume_step=state["step"])`` -- misses none of the points the checkpoint covers."""
        if self.run is not None:
            self.run.checkpoint()
        return {"step": self.step, "applier": self.applier.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the step count and never re-applies a command applied before the checkpoint."""
        self.step = int(state["step"])
        self.applier.load_state_dict(state["applier"])
        self._sums.clear()
        self._counts.clear()

    # --- internals ------------------------------------------------------------------------------------------

    def _after_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.step += 1
        step = self.step
        lr_used = optimizer.param_groups[0]["lr"]  # before the commands: the LR this update used
        applied = self.applier.step(step)
        if self.applier.rewound_to is not None:  # a rollback loaded a checkpoint: the job stands at its step
            self.step = self.applier.rewound_to
            self._sums.clear()  # recorded on the abandoned trajectory
            self._counts.clear()
            return
        stopped_now = any(a.action == "stop" and a.status == "applied" for a in applied)
        if step % self.log_every == 0 or stopped_now:  # the step a stop lands on is the last one: log it
            if self.run is not None:
                values = {self.lr_key: float(lr_used)}
                for key, total in self._sums.items():
                    values[key] = float(total) / self._counts[key]  # the one sync per logged step
                epoch = None if self.steps_per_epoch is None else step / self.steps_per_epoch
                self.run.log(values, step=step, epoch=epoch)
            self._sums.clear()
            self._counts.clear()
