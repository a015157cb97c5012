"""Stagewatch for the Hugging Face ``Trainer``: one callback (``pip install 'stagewatch[huggingface]'``).

```python
from transformers import Trainer, TrainingArguments

from trainer import start_run
from trainer.integrations.huggingface import StagewatchCallback

with start_run("http://127.0.0.1:8765", name="bert-ft") as run:
    args = TrainingArguments(output_dir="out", logging_steps=10, eval_strategy="epoch", report_to=[])
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, callbacks=[StagewatchCallback(run)])
    trainer.train()
```

What it sends: every numeric value of each ``Trainer`` log (``on_log``: ``loss``, ``grad_norm``, ``learning_rate``
-- the LR that step used --, ``eval_*`` after each evaluation, the ``train_*`` summary at the end), under the names
the ``Trainer`` gives them, with ``step = state.global_step`` (optimizer steps done) and ``epoch = state.epoch``
(fractional). How often is the ``Trainer``'s business: ``logging_steps``, ``eval_strategy``.

Commands from the server are applied at the end of every optimizer step (``on_step_end``, after the ``Trainer``'s
``lr_scheduler.step()``) by a :class:`trainer.torch.CommandApplier` on the ``Trainer``'s optimizer and LR
scheduler. The default schedules are ``LambdaLR``\\s, computed from ``base_lrs`` at every step: the applier scales
those too, so a decay lasts instead of being undone at the next step. A decay acknowledged at step ``N`` is in the
``learning_rate`` logged from step ``N + 1`` on. A ``stop`` command sets ``control.should_training_stop``: the
``Trainer`` ends training after that step (the end-of-epoch evaluation and save still happen as configured).

Stage checkpoints and rollback (``checkpoint_dir=``, or ``save_checkpoint=`` / ``load_checkpoint=`` of
:class:`trainer.torch.CommandApplier`): before a decay the model, optimizer and scheduler are saved and reported;
a ``rollback`` loads them back at the end of an optimizer step and sets ``state.global_step`` back to the
checkpoint's step (the epoch and the data go on where they were). What the ``Trainer`` logs for that step is not
sent.

The commands applied so far are saved in each checkpoint's ``trainer_state.json`` (the callback is an
``ExportableState``) and read back when training resumes from it, so a resumed job never applies one again. Keep
``TrainingArguments(restore_callback_states_from_checkpoint=False)``, the default: ``True`` makes the ``Trainer``
re-create callbacks from their saved arguments, and a run cannot be saved in a checkpoint. Use one
``StagewatchCallback`` per ``Trainer``. Under ``torch.distributed`` every process needs the callback (commands
are broadcast at the step boundary): pass the run on global rank 0 and ``None`` on the others.
"""

from __future__ import annotations

import logging
import numbers
import os
import sys
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from trainer.run import Run
from trainer.torch import CommandApplier, LoadHook, SaveHook

__all__ = ["StagewatchCallback"]

logger = logging.getLogger("trainer")

_STATE_KEY = "stagewatch"  # our entry in the checkpoint's stateful_callbacks attributes


def _scheduler_of(scheduler: Any) -> LRScheduler | ReduceLROnPlateau | None:
    """The torch scheduler itself: the ``Trainer`` may hand over accelerate's ``AcceleratedScheduler`` wrapper."""
    for candidate in (scheduler, getattr(scheduler, "scheduler", None)):
        if isinstance(candidate, (LRScheduler, ReduceLROnPlateau)):
            return candidate
    if scheduler is not None:
        logger.warning(
            "stagewatch: cannot patch an LR scheduler of type %s; commands change the optimizer's LR only, and "
            "the scheduler may undo that at its next step",
            type(scheduler).__name__,
        )
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return None


def _rewind_log_counter(step: int) -> None:
    """The ``Trainer`` logs only past the step it last logged (``_globalstep_last_logged``), a counter callbacks are
    not given: after a rollback it would stay silent up to that step and then average the loss over too few
    steps. The ``Trainer`` calling this callback is found up the call stack (``on_step_end`` is called from its
    training loop) and its counter set back too; without one (another caller) nothing changes."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            owner._globalstep_last_logged = min(owner._globalstep_last_logged, step)
            return
        frame = frame.f_back  # type: ignore[assignment]
    logger.warning("stagewatch: no Trainer up the stack; its own logs resume past the step it last logged")


class StagewatchCallback(TrainerCallback, ExportableState):
    """Logs the ``Trainer``'s logs to ``run`` and applies the server's commands; see the module doc.

    ``run`` may be ``None`` (processes other than global rank 0: they apply what rank 0 broadcasts, log nothing).
    ``sync_every`` is ``CommandApplier``'s.
    """

    def __init__(
        self,
        run: Run | None,
        *,
        sync_every: int = 1,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        save_checkpoint: SaveHook | None = None,
        load_checkpoint: LoadHook | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.run = run
        self.sync_every = sync_every
        self.checkpoint_dir = checkpoint_dir
        self._save_hook = save_checkpoint
        self._load_hook = load_checkpoint
        self._unsent_step: int | None = None  # a rollback's step: what the Trainer logs for it is not sent
        self.applier: CommandApplier | None = None  # built at on_train_begin, once the optimizer exists
        self._applied_state: dict[str, Any] = {}  # the applier's state while there is no applier

    @property
    def should_stop(self) -> bool:
        """``True`` once a ``stop`` command has been applied."""
        return self.applier is not None and self.applier.should_stop

    # --- Trainer events -------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.restore_callback_states_from_checkpoint:
            raise ValueError(
                "StagewatchCallback restores its own state from checkpoints; with "
                "restore_callback_states_from_checkpoint=True the Trainer would re-create it without its run. "
                "Leave that argument False."
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        if not isinstance(optimizer, Optimizer):
            logger.warning("stagewatch: the Trainer passed no optimizer to callbacks; commands will not be applied")
            return
        # Resumed from a checkpoint: the state saved in it. Otherwise: our own (the Trainer has just stored it
        # there from state()), so a second train() with this callback does not forget what it applied.
        # Declared as a list of callbacks, but TrainerState turns it into {class name: state()} when created.
        stored: Any = state.stateful_callbacks
        saved = stored.get(type(self).__name__) if isinstance(stored, dict) else None
        if isinstance(saved, dict):
            self._applied_state = dict(saved.get("attributes", {}).get(_STATE_KEY) or self.state_dict())
        else:
            self._applied_state = self.state_dict()
        model = kwargs.get("model")
        self.applier = CommandApplier(
            self.run,
            optimizer,
            _scheduler_of(kwargs.get("lr_scheduler")),
            sync_every=self.sync_every,
            model=model if isinstance(model, torch.nn.Module) else None,
            checkpoint_dir=self.checkpoint_dir,
            save_checkpoint=self._save_hook,
            load_checkpoint=self._load_hook,
        )
        if self._applied_state:
            self.applier.load_state_dict(self._applied_state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.applier is None:
            return
        self.applier.step(state.global_step)
        if self.applier.rewound_to is not None:  # the checkpoint is loaded: back to its step
            state.global_step = self._unsent_step = self.applier.rewound_to
            _rewind_log_counter(state.global_step)
            return
        if self.applier.should_stop:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.run is None or not logs:
            return
        if self._unsent_step is not None:
            if self._unsent_step == state.global_step:
                return  # the step of a rollback, on the abandoned trajectory; its step is stored already
            self._unsent_step = None
        values: dict[str, float] = {}
        for key, value in logs.items():
            number = _number(value)
            if key != "epoch" and number is not None:  # the epoch goes with the points, not as a series
                values[key] = number
        if values:
            self.run.log(values, step=state.global_step, epoch=state.epoch)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The points logged so far survive a crash from here on (:meth:`trainer.run.Run.checkpoint`): a job
        resumed from this checkpoint misses none of the points it covers."""
        if self.run is not None:
            self.run.checkpoint()

    def state(self) -> dict[str, Any]:
        """What the ``Trainer`` saves in ``trainer_state.json``: no arguments, the applied commands."""
        return {"args": {}, "attributes": {_STATE_KEY: self.state_dict()}}

    def state_dict(self) -> dict[str, Any]:
        """The commands applied so far (``CommandApplier.state_dict``)."""
        return self.applier.state_dict() if self.applier is not None else dict(self._applied_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._applied_state = dict(state_dict)
        if self.applier is not None:
            self.applier.load_state_dict(self._applied_state)
