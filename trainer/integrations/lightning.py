"""Stagewatch for PyTorch Lightning: one callback (``pip install 'stagewatch[lightning]'``).

```python
import lightning.pytorch as pl

from trainer import start_run
from trainer.integrations.lightning import StagewatchCallback

with start_run("http://127.0.0.1:8765", name="lit-mlp") as run:
    trainer = pl.Trainer(max_epochs=10, callbacks=[StagewatchCallback(run)])
    trainer.fit(model, datamodule=data)
```

What it sends, with ``step = trainer.global_step`` (optimizer steps done, so the first step is 1) and ``epoch`` the
fraction of training epochs done (``current_epoch + (batch_idx + 1) / num_training_batches``):

- every metric Lightning sends to its loggers during ``fit`` -- what the module logs with ``self.log(...)``:
  step-level metrics every ``Trainer(log_every_n_steps=...)`` steps, epoch aggregates at the end of each epoch,
  validation metrics at the end of each validation, names as Lightning forms them (``train_loss_step``,
  ``train_loss_epoch``, ``val_loss``). For that, the callback adds a logger of its own to ``trainer.loggers`` from
  ``setup`` to ``teardown`` of ``fit``; it writes no files and keeps ``trainer.log_dir`` and the default checkpoint
  directory where they would be without it. ``log_metrics=False`` turns this off;
- ``lr``: the LR of the first optimizer's first param group that each optimizer step used, at the same cadence
  (every ``log_every_n_steps``, by default the trainer's, and the step training stops at).

Commands from the server are applied at the end of every training batch that stepped the optimizer
(``on_train_batch_end``, after Lightning's step-interval ``scheduler.step()``) by a
:class:`trainer.torch.CommandApplier` on the first optimizer and its LR scheduler from
``trainer.lr_scheduler_configs``, patched so that the schedule goes on from the new LR. A decay acknowledged at
step ``N`` is in the ``lr`` logged from step ``N + 1`` on. A ``stop`` command sets ``trainer.should_stop``:
Lightning ends ``fit`` after that batch (``min_epochs``/``min_steps`` still apply).

Stage checkpoints and rollback (``checkpoint_dir=``, or ``save_checkpoint=`` / ``load_checkpoint=`` of
:class:`trainer.torch.CommandApplier`): before a decay the LightningModule, the optimizer and scheduler are saved
and reported; a ``rollback`` loads them back at the end of a batch and sets ``trainer.global_step`` back to the
checkpoint's step (Lightning's optimizer-step counter, so ``max_steps`` and the logged steps follow; the epoch and
the data loader go on where they were). What Lightning logs for that batch is not sent.

The commands applied so far are the callback's state in Lightning checkpoints (``Callback.state_dict``), so
``trainer.fit(..., ckpt_path=...)`` never applies one again. Under DDP every rank needs the callback (commands are
broadcast at the step boundary): pass the run on global rank 0 and ``None`` on the others.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainer.run import Run
from trainer.torch import CommandApplier, LoadHook, SaveHook

__all__ = ["StagewatchCallback"]


class StagewatchCallback(Callback):
    """Logs Lightning's metrics and the LR to ``run`` and applies the server's commands; see the module doc.

    ``run`` may be ``None`` (DDP ranks other than 0: they apply the commands rank 0 broadcasts, log nothing).
    ``log_every_n_steps`` sets how often ``lr`` is logged (default: ``Trainer(log_every_n_steps=...)``, the cadence
    of Lightning's own step metrics); ``lr_key`` its name. ``sync_every`` is ``CommandApplier``'s.
    """

    def __init__(
        self,
        run: Run | None,
        *,
        log_every_n_steps: int | None = None,
        lr_key: str = "lr",
        log_metrics: bool = True,
        sync_every: int = 1,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        save_checkpoint: SaveHook | None = None,
        load_checkpoint: LoadHook | None = None,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.run = run
        self.log_every_n_steps = log_every_n_steps
        self.lr_key = lr_key
        self.log_metrics = log_metrics
        self.sync_every = sync_every
        self.checkpoint_dir = checkpoint_dir
        self._save_hook = save_checkpoint
        self._load_hook = load_checkpoint
        self._unsent_step: int | None = None  # a rollback's batch: what Lightning logs for it is not sent
        self.applier: CommandApplier | None = None  # built at on_train_start, once the optimizers exist
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, loaded before the applier exists
        self._trainer: pl.Trainer | None = None
        self._forwarder = _MetricsForwarder(self)
        self._lr_used: float | None = None
        self._last_step = -1
        self._epoch: float | None = None
        self._checkpoint_step: int | None = None  # a checkpoint at this step still waits for its step's metrics

    @property
    def should_stop(self) -> bool:
        """``True`` once a ``stop`` command has been applied."""
        return self.applier is not None and self.applier.should_stop

    # --- lifecycle ------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        # Only for fit: a later trainer.validate()/test() would log at the final step again, and could conflict
        # with values stored for that step during fit.
        attached = any(logger is self._forwarder for logger in trainer.loggers)
        if stage == "fit" and self.log_metrics and self.run is not None and not attached:
            trainer.loggers = [*trainer.loggers, self._forwarder]  # last: loggers[0] keeps deciding paths

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(logger is self._forwarder for logger in trainer.loggers):
            trainer.loggers = [logger for logger in trainer.loggers if logger is not self._forwarder]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        scheduler: LRScheduler | ReduceLROnPlateau | None = None
        for config in trainer.lr_scheduler_configs:
            candidate = config.scheduler
            if getattr(candidate, "optimizer", None) is optimizer and isinstance(
                candidate, (LRScheduler, ReduceLROnPlateau)
            ):
                scheduler = candidate
                break
        # A second fit() with this callback, or a resume: keep what was applied, never apply it twice.
        state = self._restored if self._restored is not None else self.state_dict()
        self.applier = CommandApplier(
            self.run,
            optimizer,
            scheduler,
            sync_every=self.sync_every,
            model=pl_module,
            checkpoint_dir=self.checkpoint_dir,
            save_checkpoint=self._save_hook,
            load_checkpoint=self._load_hook,
        )
        if state:
            self.applier.load_state_dict(state)
        self._restored = None
        self._last_step = trainer.global_step
        self._lr_used = None

    # --- the training loop ----------------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.applier is not None:
            self._lr_used = self.applier.current_lr()  # what this step uses; the scheduler changes it afterwards

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step, no boundary
            return
        self._last_step = step
        batches = trainer.num_training_batches
        self._epoch = trainer.current_epoch + (batch_idx + 1) / batches if math.isfinite(batches) else None
        # Set by Trainer.__init__ but not declared on the class; 0 (barebones) means no step-level logging.
        if self.applier is not None:
            self.applier.step(step)
            if self.applier.rewound_to is not None:  # the checkpoint is loaded: back to its step
                _set_global_step(trainer, self.applier.rewound_to)
                self._last_step = self._unsent_step = trainer.global_step
                return
            if self.applier.should_stop:
                trainer.should_stop = True
        every = self.log_every_n_steps
        if every is None:
            every = int(getattr(trainer, "log_every_n_steps", 1))
        # Lightning's own cadence: every n-th step, and the step training stops at.
        due = every > 0 and (step % every == 0 or trainer.should_stop)
        if self.run is not None and self._lr_used is not None and due:
            self.run.log({self.lr_key: self._lr_used}, step=step, epoch=self._epoch)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The points logged so far survive a crash from here on (:meth:`trainer.run.Run.checkpoint`): a job
        resumed from this checkpoint misses none of the points it covers."""
        if self.run is not None:
            self.run.checkpoint()
            # Lightning saves in on_train_batch_end, *before* it hands that step's metrics to the loggers: the
            # step's own points arrive in _forward right after, and are made durable there too.
            self._checkpoint_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """The commands applied so far (``CommandApplier.state_dict``), saved in Lightning checkpoints."""
        if self.applier is not None:
            return self.applier.state_dict()
        return dict(self._restored or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start builds the applier: keep it until then.
        self._restored = dict(state_dict)
        if self.applier is not None:
            self.applier.load_state_dict(self._restored)

    # --- internals ------------------------------------------------------------------------------------------

    def _forward(self, metrics: Mapping[str, Any]) -> None:
        """Lightning's metrics, as its loggers get them, at the current global step."""
        if self.run is None or self._trainer is None:
            return
        if self._unsent_step is not None:
            if self._unsent_step == self._trainer.global_step:
                return  # the batch of a rollback, on the abandoned trajectory; its step is stored already
            self._unsent_step = None
        # Lightning adds the epoch index under "epoch"; the fractional epoch is sent as the points' epoch.
        values = {
            key: float(value)
            for key, value in metrics.items()
            if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        if values:
            self.run.log(values, step=self._trainer.global_step, epoch=self._epoch)
        if self._checkpoint_step == self._trainer.global_step:
            self._checkpoint_step = None
            self.run.checkpoint()


def _set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Sets Lightning's count of optimizer steps (``trainer.global_step``) back to ``step``."""
    loop = trainer.fit_loop.epoch_loop
    module = trainer.lightning_module
    if module is None or module.automatic_optimization:
        tracker: Any = loop.automatic_optimization.optim_progress.optimizer.step.total
    else:
        tracker = loop.manual_optimization.optim_step_progress.total
    back = tracker.completed - step
    tracker.ready = tracker.completed = step
    loop._batches_that_stepped = max(0, loop._batches_that_stepped - back)  # the step Lightning's loggers see


class _MetricsForwarder(Logger):
    """A Lightning logger that hands what Lightning logs to the callback. Its save directory is the trainer's
    ``default_root_dir`` and its name and version are empty, so ``trainer.log_dir`` and the default checkpoint
    directory (``<save_dir>/<name>/<version>/checkpoints``) stay what they would be without it."""

    def __init__(self, callback: StagewatchCallback) -> None:
        super().__init__()
        self._callback = callback

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str | None:
        trainer = self._callback._trainer
        return None if trainer is None else str(trainer.default_root_dir)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # Lightning's own step here is the 0-based count of batches that stepped, before the increment of the
        # current one; the callback uses trainer.global_step, as for everything it logs.
        self._callback._forward(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters belong in ``start_run(config=...)``; nothing to do here."""
