"""The training jobs of the reproduction report: real ``trainer.loop.fit`` runs streamed to a real server.

Each job is one process (spawned by :mod:`benchmarks.paper.__main__`, ``--jobs`` at a time, one torch thread
each) that trains the ``mnist1d-cnn`` recipe exactly as ``stagewatch train`` does -- same task, same optimizer
(SGD, momentum 0.9, weight decay 5e-4), same loop -- through :func:`trainer.run.start_run`, the real client,
with the server-side AutoDecay detector in observe mode (what ``stagewatch train --schedule step`` creates).

For claim (d) a StepDecay job keeps the model at the end of every stage: the schedule's stage ends are known
(:func:`trainer.loop.step_milestones`), so ``fit``'s ``on_epoch`` hook copies the weights after the last epoch
at each rate -- just before the next update runs at the decayed rate -- and after the last epoch. The copies
stay in the job's memory and are evaluated on the shifted task right there (:mod:`benchmarks.paper.transfer`):
nothing is written to disk and no product feature is needed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.paper import transfer
from trainer.loop import EpochStats, fit, step_milestones
from trainer.recipes.mnist1d import NUM_CLASSES, load_data, make_task
from trainer.run import start_run
from trainer.train_cli import MOMENTUM, WEIGHT_DECAY, detector_config

PROJECT = "paper"


@dataclass(frozen=True)
class Job:
    """One training run: ``kind`` is ``sgd`` (minibatch StepDecay, the paper's setting), ``gd`` (full batch,
    the same epochs) or ``gd-long`` (full batch, more epochs, so that it trains at all); ``evaluate_transfer`` also
    evaluates the stage-end checkpoints on the shifted tasks."""

    kind: str
    seed: int
    epochs: int
    batch_size: int  # 0 = full batch
    lr: float
    num_samples: int
    url: str
    evaluate_transfer: bool = False
    transfer_samples: int = transfer.TARGET_SAMPLES

    @property
    def name(self) -> str:
        return f"paper {self.kind} seed={self.seed}"


def run_job(job: Job) -> dict[str, Any]:
    """Trains ``job`` to the server at ``job.url``; returns its run id, per-epoch curve, wall time and (with
    ``transfer``) the per-stage transfer results. Runs in a worker process: everything returned is plain data."""
    data = load_data(num_samples=job.num_samples)
    task = make_task(data, batch_size=job.batch_size, seed=job.seed)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=job.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    milestones = step_milestones(job.epochs)
    # Stage k ends after the last epoch at its rate: epoch m (completed) for each milestone m, and the last one.
    stage_ends = [*milestones, job.epochs]
    checkpoints: dict[int, dict[str, torch.Tensor]] = {}
    if job.evaluate_transfer:
        checkpoints[0] = copy.deepcopy(task.model.state_dict())  # the initialisation: a reference row
    curve: list[dict[str, float]] = []

    def on_epoch(stats: EpochStats) -> None:
        curve.append({
            "epoch": stats.epoch,
            "step": stats.step,
            "lr": stats.lr,
            "train_loss": stats.train_loss,
            "test_loss": stats.test_loss,
            "test_accuracy": stats.test_accuracy,
        })  # fmt: skip
        if job.evaluate_transfer and stats.epoch in stage_ends:
            checkpoints[stats.epoch] = copy.deepcopy(task.model.state_dict())

    config = {
        "recipe": "mnist1d-cnn",
        "schedule": "step",
        "milestones": milestones,
        "lr": job.lr,
        "epochs": job.epochs,
        "batch_size": job.batch_size,
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "seed": job.seed,
        "steps_per_epoch": task.steps_per_epoch,
        "paper_kind": job.kind,
        **task.description,
    }
    started = time.perf_counter()
    with start_run(
        job.url,
        name=job.name,
        project=PROJECT,
        config=config,
        tags=["paper", job.kind],
        detector=detector_config(num_classes=NUM_CLASSES),
        mode="observe",
    ) as run:
        run_id = run.id
        result = fit(task, run, schedule="step", epochs=job.epochs, optimizer=optimizer, on_epoch=on_epoch)
        if not run.flush(timeout=120.0):
            raise RuntimeError(f"{job.name}: run {run_id} did not flush its points to the server")
    train_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "kind": job.kind,
        "seed": job.seed,
        "run_id": run_id,
        "epochs": job.epochs,
        "batch_size": job.batch_size,
        "lr": job.lr,
        "steps_per_epoch": task.steps_per_epoch,
        "milestones": milestones,
        "curve": curve,
        "final_test_accuracy": result.test_accuracy,
        "train_s": train_s,
    }
    if job.evaluate_transfer:
        started = time.perf_counter()
        source_acc = {int(c["epoch"]): c["test_accuracy"] for c in curve}
        out["transfer"] = [
            {
                "stage": index,  # 0 = initialisation, 1.. = end of stage k
                "epoch": epoch,
                "source_test_accuracy": source_acc.get(epoch),
                **transfer.evaluate_checkpoint(state, seed=job.seed, num_samples=job.transfer_samples),
            }
            for index, (epoch, state) in enumerate(sorted(checkpoints.items()))
        ]
        out["transfer_s"] = time.perf_counter() - started
    return out
