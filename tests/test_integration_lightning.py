"""``trainer.integrations.lightning.StagewatchCallback`` in a real (tiny) Lightning ``fit`` against the real server.

An "operator" callback of the test posts a command over HTTP at a chosen step and waits until the run has it, so
the Stagewatch callback applies it at the end of that step's batch; the test reads back what the server stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainer
from tests.conftest import LiveServer
from tests.test_integration_pytorch import (
    BATCH,
    EPOCHS,
    FACTOR,
    LR0,
    assert_applied,
    open_run,
    post_and_deliver,
    schedule,
    separable_data,
    series,
    stored_keys,
)
from trainer.integrations.lightning import StagewatchCallback

pytestmark = [
    pytest.mark.slow,
    # Lightning's advice for a real job; with an 8-batch in-memory dataset, worker processes would only add time.
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers:UserWarning"),
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.13 deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y), batch_size=len(x))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # closed form: undoes an unpatched decay
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Operator(pl.Callback):
    """Posts ``command`` before the optimizer step ``at`` and waits for its delivery: it is applied at ``at``."""

    def __init__(self, client: httpx.Client, run: trainer.Run, at: int, **command: Any) -> None:
        self.client, self.run, self.at, self.command = client, run, at, command
        self.command_id: int | None = None
        self.log_dir: str | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.log_dir = trainer.log_dir  # with the Stagewatch callback's logger attached
        if trainer.global_step == self.at - 1 and self.command_id is None:
            self.command_id = post_and_deliver(self.client, self.run, **self.command)


def loaders() -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    x, y = separable_data()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH), DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)


def make_trainer(tmp_path: Path, max_epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )


def test_callback_logs_metrics_and_lr_applies_a_decay_and_resumes_from_a_checkpoint(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    decay_at = 10
    train, val = loaders()
    steps_per_epoch = len(train)
    with open_run(server, tmp_path, "lightning") as run:
        assert run.id is not None
        torch.manual_seed(0)
        model = Classifier()
        watch = StagewatchCallback(run)
        operator = Operator(client, run, decay_at, action="decay", factor=FACTOR)
        fit = make_trainer(tmp_path, EPOCHS, operator, watch)
        fit.fit(model, train, val)
        steps = EPOCHS * steps_per_epoch
        assert fit.global_step == steps
        assert not fit.should_stop and not watch.should_stop
        optimizer = fit.optimizers[0]
        # 14 LambdaLR steps after the decay, the schedule still goes on from the decayed base.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR0 * FACTOR * schedule(steps))
        # Its logger did not move what Trainer(logger=False) puts under default_root_dir, and left at teardown.
        assert operator.log_dir == str(tmp_path)
        assert fit.loggers == []
        checkpoint = tmp_path / "last.ckpt"
        fit.save_checkpoint(checkpoint)

        # Resume one more epoch with a fresh callback: the applied command comes back from the checkpoint.
        resumed_watch = StagewatchCallback(run)
        resumed = make_trainer(tmp_path, EPOCHS + 1, resumed_watch)
        resumed.fit(Classifier(), train, val, ckpt_path=checkpoint)
        assert resumed.global_step == steps + steps_per_epoch
        assert resumed_watch.applier is not None and list(resumed_watch.applier.applied) == [operator.command_id]
        assert run.flush(timeout=15)

    total = steps + steps_per_epoch
    epoch_ends = [steps_per_epoch * e for e in range(1, EPOCHS + 2)]
    expected_lr = {s: LR0 * schedule(s - 1) * (FACTOR if s > decay_at else 1.0) for s in range(1, total + 1)}
    lrs = series(client, run.id, "lr")
    assert [p["step"] for p in lrs] == list(range(1, total + 1))  # one point per optimizer step
    assert {p["step"]: p["value"] for p in lrs} == pytest.approx(expected_lr)
    assert [p["epoch"] for p in lrs] == pytest.approx([s / steps_per_epoch for s in range(1, total + 1)])
    assert [p["step"] for p in series(client, run.id, "train_loss_step")] == list(range(1, total + 1))
    for key in ("train_loss_epoch", "val_loss"):
        points = series(client, run.id, key)
        assert [(p["step"], p["epoch"]) for p in points] == [(s, s / steps_per_epoch) for s in epoch_ends], key
    val_losses = [p["value"] for p in series(client, run.id, "val_loss")]
    assert val_losses[-1] < val_losses[0]  # it learns
    # Lightning's own "epoch" entry is the points' epoch, not a series; stale values are not re-sent per step.
    assert stored_keys(client, run.id) == {"lr", "train_loss_step", "train_loss_epoch", "val_loss"}

    assert operator.command_id is not None
    # Lightning steps the scheduler before on_train_batch_end: the decayed LR is the one update decay_at + 1 uses.
    assert_applied(client, run.id, operator.command_id, step=decay_at, lr=expected_lr[decay_at + 1])


def test_callback_stops_fit_on_a_stop_command(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    stop_at = 5
    train, val = loaders()
    with open_run(server, tmp_path, "lightning-stop") as run:
        assert run.id is not None
        watch = StagewatchCallback(run)
        operator = Operator(client, run, stop_at, action="stop")
        fit = make_trainer(tmp_path, EPOCHS, operator, watch)
        fit.fit(Classifier(), train, val)
        assert fit.global_step == stop_at  # of 24
        assert fit.should_stop and watch.should_stop and run.should_stop
        assert run.flush(timeout=15)

    assert [p["step"] for p in series(client, run.id, "lr")] == list(range(1, stop_at + 1))
    assert operator.command_id is not None
    assert_applied(client, run.id, operator.command_id, step=stop_at, lr=LR0 * schedule(stop_at))
