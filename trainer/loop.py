"""The supervised training loop behind ``stagewatch train``, shared by every recipe.

A recipe (:mod:`trainer.recipes`) supplies a :class:`Task`: the model, its minibatches per epoch and an
evaluation. :func:`fit` trains it with SGD under one of four schedules and streams it to a run:

* per update: ``train/loss`` (the minibatch loss before the update) and ``lr`` (the rate the update used),
  at ``step`` = updates done so far and ``epoch`` = ``step / steps_per_epoch``;
* per epoch: ``epoch/train_loss`` (the mean minibatch loss of the epoch), ``test/loss`` and ``test/accuracy``.

Schedules (``--schedule``):

* ``constant`` -- the starting rate throughout;
* ``step`` -- StepDecay: x0.1 at 50% and at 75% of the epochs (the paper's baseline);
* ``plateau`` -- PyTorch's ``ReduceLROnPlateau`` with its defaults (x0.1 after 10 epochs without a 1e-4
  relative improvement), stepped once per epoch on ``epoch/train_loss``: the same signal the server's
  AutoDecay watches, so the two differ only in the rule;
* ``autodecay`` -- a constant rate in the worker; the server's detector decides the decays (and the stop), and
  the run's mode decides whether they are applied at once, after approval, or only drawn.

After every update a :class:`trainer.torch.CommandApplier` applies the server's commands (decay, set_lr,
stop, rollback) to the optimizer *and* the scheduler, so a server-decided decay and a scheduled one compose. A
``stop`` ends training at that step. With ``checkpoint_dir`` a stage checkpoint is saved there before every
decay or LR change and reported to the server; a ``rollback`` loads one and training goes on from its step (the
epoch it falls in, without the minibatches already trained).

``on_step`` and ``on_epoch`` hand each update's and each completed epoch's statistics (:class:`StepStats`,
:class:`EpochStats`) to the caller: the benchmarks record curves and time epochs through them, so the numbers
they publish come from this loop, the one ``stagewatch train`` runs. Without them the loop does no extra work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from trainer.torch import CommandApplier, CommandSource

__all__ = ["SCHEDULES", "EpochStats", "FitResult", "FitRun", "StepStats", "Task", "fit", "step_milestones"]

SCHEDULES = ("constant", "step", "plateau", "autodecay")
TRAIN_LOSS = "train/loss"
EPOCH_TRAIN_LOSS = "epoch/train_loss"


@dataclasses.dataclass(frozen=True)
class Task:
    """What a recipe gives the loop.

    ``batches(epoch)`` yields the ``(inputs, labels)`` minibatches of that 0-based epoch, already on
    ``device``; ``steps_per_epoch`` is how many it yields. ``evaluate(model)`` returns the test loss and
    accuracy (it may switch the model to eval mode; the loop switches it back).
    """

    model: nn.Module
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    steps_per_epoch: int
    evaluate: Callable[[nn.Module], tuple[float, float]]
    description: dict[str, Any]  # recipe facts recorded in the run's config (data, sizes, ...)


class FitRun(CommandSource, Protocol):
    """What :func:`fit` needs of a run: :class:`trainer.run.Run` is one; benchmarks and tests pass in-memory ones."""

    @property
    def id(self) -> int | None: ...

    def log(
        self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False
    ) -> None: ...

    def sync_detection(self, timeout: float = 30.0) -> bool: ...


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One update, handed to ``fit(on_step=...)`` right after it (and after the run's commands were applied)."""

    step: int  # updates done so far, from 1: this is the step-th
    epoch: int  # 0-based index of the epoch the update belongs to
    lr: float  # the rate the update used
    loss: float  # the minibatch loss, computed at the parameters before the update
    outputs: torch.Tensor  # the model's outputs on the minibatch (before the update; still attached to autograd)
    labels: torch.Tensor  # the minibatch's labels


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """A completed epoch, handed to ``fit(on_epoch=...)`` once its points are logged (what the run got, plus time)."""

    epoch: int  # completed epochs, from 1
    step: int  # updates done so far
    lr: float  # the rate of the epoch's last update
    train_loss: float  # mean minibatch loss of the epoch, weighted by minibatch size (``epoch/train_loss``)
    test_loss: float
    test_accuracy: float
    seconds: float  # wall time of the epoch: updates, per-step logging and commands, evaluation, epoch logging


@dataclasses.dataclass(frozen=True)
class FitResult:
    epochs: int  # completed epochs
    steps: int
    stopped: bool  # ended by a stop command
    test_loss: float
    test_accuracy: float
    lr: float  # the rate in effect at the end
    seconds: float


def step_milestones(epochs: int) -> list[int]:
    """The 0-based epochs at which the ``step`` schedule decays: 50% and 75% of the way through."""
    return [epochs // 2, (3 * epochs) // 4]


def _scheduler(
    schedule: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
) -> LambdaLR | ReduceLROnPlateau:
    if schedule == "plateau":
        return ReduceLROnPlateau(optimizer)
    milestones = step_milestones(epochs) if schedule == "step" else []

    # The scheduler counts updates; update k + 1 belongs to epoch k // steps_per_epoch. A server decay scales
    # its base LR (CommandApplier patches it), so the schedule goes on from the server's new rate.
    def factor(done: int) -> float:
        epoch = done // steps_per_epoch
        return 0.1 ** sum(1 for m in milestones if epoch >= m)

    return LambdaLR(optimizer, factor)


def fit(
    task: Task,
    run: FitRun,
    *,
    schedule: str,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None] = lambda line: None,
    sync_detection: bool = False,
    on_step: Callable[[StepStats], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> FitResult:
    """Trains ``task.model`` for up to ``epochs`` epochs with ``optimizer`` under ``schedule`` (see the
    module doc), logging to ``run`` and applying its commands; ``log`` receives one line per epoch,
    ``on_step`` and ``on_epoch`` (optional) each update's and each completed epoch's statistics.

    ``sync_detection``: after each epoch, wait until the server's detection has examined the epoch's points and
    the job holds the commands they led to (:meth:`trainer.run.Run.sync_detection`), so that a decision lands
    at the same epoch on a fast or a loaded machine: for tests and benchmarks, at the cost of a round trip.

    ``checkpoint_dir``: stage checkpoints (see the module doc)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    model = task.model
    per_epoch = task.steps_per_epoch
    scheduler = _scheduler(schedule, optimizer, epochs, per_epoch)
    applier = CommandApplier(run, optimizer, scheduler, model=model, checkpoint_dir=checkpoint_dir)
    started = time.perf_counter()
    step = completed = 0
    test_loss = test_acc = math.nan
    model.train()
    lr = applier.current_lr()
    epoch = skip = 0  # skip: minibatches of `epoch` trained before the checkpoint a rollback went back to
    while epoch < epochs:
        epoch_started = time.perf_counter()
        loss_sum = 0.0
        seen = 0
        rolled_back = False
        for i, (x, y) in enumerate(task.batches(epoch)):
            if i < skip:
                continue
            lr = applier.current_lr()
            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            if isinstance(scheduler, LambdaLR):
                scheduler.step()
            step += 1
            loss_value = loss.item()
            loss_sum += loss_value * len(y)
            seen += len(y)
            run.log({TRAIN_LOSS: loss_value, "lr": lr}, step=step, epoch=step / per_epoch)
            applier.step(step)
            if applier.rewound_to is not None:  # the checkpoint's weights, optimizer and LR are loaded
                step = applier.rewound_to
                epoch, skip = divmod(step, per_epoch)
                completed = epoch
                rolled_back = True
                log(f"stagewatch train: run {run.id} rolled back to step {step} (epoch {epoch + 1})")
                break
            if on_step is not None:
                on_step(StepStats(step=step, epoch=epoch, lr=lr, loss=loss_value, outputs=outputs, labels=y))
            if applier.should_stop:
                break
        if rolled_back:
            continue
        if applier.should_stop:
            log(f"stagewatch train: run {run.id} stopped by the server at step {step} (epoch {epoch + 1})")
            break
        skip = 0
        completed = epoch + 1
        test_loss, test_acc = task.evaluate(model)
        model.train()
        train_loss = loss_sum / max(seen, 1)
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(train_loss)
        run.log(
            {EPOCH_TRAIN_LOSS: train_loss, "test/loss": test_loss, "test/accuracy": test_acc},
            step=step,
            epoch=float(completed),
            urgent=True,  # the server's detector watches these: its decision can apply in the next epoch
        )
        if on_epoch is not None:
            # Timed before the detection sync: that wait is a test aid, not a cost of training.
            seconds = time.perf_counter() - epoch_started
            on_epoch(EpochStats(completed, step, lr, train_loss, test_loss, test_acc, seconds))
        if sync_detection and not run.sync_detection():
            log(f"stagewatch train: run {run.id}: the server's detection did not catch up; going on")
        log(
            f"epoch {completed}/{epochs}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
            f"test accuracy {test_acc:.3f}  lr {applier.current_lr():.3g}"
        )
        epoch += 1
    return FitResult(
        epochs=completed,
        steps=step,
        stopped=applier.should_stop,
        test_loss=test_loss,
        test_accuracy=test_acc,
        lr=applier.current_lr(),
        seconds=time.perf_counter() - started,
    )
