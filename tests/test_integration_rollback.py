"""Stage checkpoints and rollback through the framework integrations, in real (tiny) trainings against the real
server: the plain PyTorch hook, Lightning's ``fit`` and the Hugging Face ``Trainer.train()``.

An operator callback posts a decay at one step (the integration saves a stage checkpoint first), then a rollback to
that checkpoint a few steps later; at the next batch the test compares every parameter with the saved file
(bit-identical) and the LR with the pre-decay one. The server ends up with each step once, the decay rolled back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import trainer
from tests.conftest import LiveServer
from tests.test_integration_huggingface import make_trainer as make_hf_trainer
from tests.test_integration_lightning import Classifier, loaders
from tests.test_integration_lightning import make_trainer as make_lightning_trainer
from tests.test_integration_pytorch import (
    BATCH,
    EPOCHS,
    FACTOR,
    LR0,
    open_run,
    post_and_deliver,
    schedule,
    separable_data,
    series,
    wait_delivered,
)
from trainer.integrations.huggingface import StagewatchCallback as HfCallback
from trainer.integrations.lightning import StagewatchCallback as LightningCallback
from trainer.integrations.pytorch import StagewatchHook

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]

DECAY_AT = 6
ROLLBACK_AT = 12


class Operator:
    """Decays before step ``DECAY_AT``, rolls back to the stage checkpoint before ``ROLLBACK_AT``, and checks the
    state the job has right after the rollback (before its next update)."""

    def __init__(self, client: httpx.Client, run: trainer.Run) -> None:
        self.client, self.run = client, run
        self.decay_id: int | None = None
        self.rollback_id: int | None = None
        self.checkpoint: dict[str, Any] | None = None
        self.checked: dict[str, Any] | None = None
        self.steps_seen: list[int] = []

    def before_step(self, global_step: int, model: torch.nn.Module, lr: float) -> None:
        """Called before the update that makes ``global_step + 1``."""
        self.steps_seen.append(global_step)
        assert self.run.id is not None
        if global_step == DECAY_AT - 1 and self.decay_id is None:
            self.decay_id = post_and_deliver(self.client, self.run, action="decay", factor=FACTOR)
        elif global_step == ROLLBACK_AT - 1 and self.rollback_id is None:
            assert self.run.flush(15)
            (self.checkpoint,) = self.client.get(f"/api/v1/runs/{self.run.id}/checkpoints").json()["data"]
            body = {"checkpoint_id": self.checkpoint["id"], "reason": "too early"}
            response = self.client.post(f"/api/v1/runs/{self.run.id}/rollback", json=body)
            assert response.status_code == 201, response.text
            self.rollback_id = response.json()["id"]
            wait_delivered(self.run, self.rollback_id)  # applied at the end of this step
        elif self.checkpoint is not None and self.checked is None and global_step == self.checkpoint["step"]:
            saved = torch.load(self.checkpoint["uri"], weights_only=False)
            self.checked = {
                "identical": all(torch.equal(t, saved["model"][k]) for k, t in model.state_dict().items()),
                "lr": lr,
                "saved_lr": saved["optimizer"]["param_groups"][0]["lr"],
            }


def check_server(
    client: httpx.Client, run_id: int, operator: Operator, last_step: int, lr_key: str, lr: float | None = None
) -> None:
    """``lr``: the LR the next update uses after the rollback (default: the one saved in the checkpoint)."""
    assert operator.checkpoint is not None and operator.checked is not None
    at = operator.checkpoint["step"]
    assert at == DECAY_AT
    assert operator.checked["identical"]
    assert operator.checked["lr"] == (operator.checked["saved_lr"] if lr is None else lr)
    steps = [p["step"] for p in series(client, run_id, lr_key)]
    assert steps == sorted(set(steps)) and steps[-1] == last_step  # each step once, up to the end
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert [(d["id"], d["status"]) for d in decisions] == [
        (operator.decay_id, "rolled_back"),
        (operator.rollback_id, "applied"),
    ]
    (rewind,) = client.get(f"/api/v1/runs/{run_id}/rewinds").json()["data"]
    assert rewind["step"] == at


def test_pytorch_hook_rollback(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = separable_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    with open_run(server, tmp_path, "hook-rollback") as run:
        assert run.id is not None
        operator = Operator(client, run)
        hook = StagewatchHook(run, optimizer, scheduler, model=model, checkpoint_dir=tmp_path / "ckpts")
        for _ in range(EPOCHS):
            for xs, ys in loader:
                operator.before_step(hook.step, model, hook.current_lr())
                loss = torch.nn.functional.cross_entropy(model(xs), ys)
                hook.record(loss)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()  # the hook applies the rollback here, and hook.step goes back
                scheduler.step()
        assert hook.step == EPOCHS * len(loader) - (ROLLBACK_AT - DECAY_AT)
        assert run.flush(15)
        run_id = run.id
    # The hook saves and loads inside optimizer.step(), before the loop's scheduler.step(): the update after the
    # rollback uses what the update after the checkpoint would have used without the decay.
    check_server(client, run_id, operator, hook.step, "lr", lr=LR0 * schedule(DECAY_AT))
    assert [p["step"] for p in series(client, run_id, "loss")] == list(range(1, hook.step + 1))


class LightningOperator(pl.Callback):
    def __init__(self, operator: Operator) -> None:
        self.operator = operator

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.operator.before_step(trainer.global_step, pl_module, lr)


def test_lightning_rollback(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    train, val = loaders()
    with open_run(server, tmp_path, "lightning-rollback") as run:
        assert run.id is not None
        torch.manual_seed(0)
        operator = Operator(client, run)
        watch = LightningCallback(run, checkpoint_dir=tmp_path / "ckpts")
        fit = make_lightning_trainer(tmp_path, EPOCHS, LightningOperator(operator), watch)
        fit.fit(Classifier(), train, val)
        assert run.flush(15)
        batches = EPOCHS * len(train)
        # The rollback set global_step back by the steps it undid; the data went on to the end of the epochs.
        assert fit.global_step == batches - (ROLLBACK_AT - DECAY_AT)
        run_id = run.id
    check_server(client, run_id, operator, fit.global_step, "lr")


class HfOperator(TrainerCallback):
    def __init__(self, operator: Operator) -> None:
        self.operator = operator

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.operator.before_step(state.global_step, kw["model"], float(kw["optimizer"].param_groups[0]["lr"]))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_huggingface_rollback(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    with open_run(server, tmp_path, "hf-rollback") as run:
        assert run.id is not None
        operator = Operator(client, run)
        watch = HfCallback(run, checkpoint_dir=tmp_path / "ckpts")
        hf = make_hf_trainer(tmp_path / "out", HfOperator(operator), watch)
        hf.train()
        assert run.flush(15)
        run_id = run.id
        last = hf.state.global_step
    check_server(client, run_id, operator, last, "learning_rate")
    # The Trainer logged every step again after the rollback (its own log counter was set back too).
    assert [p["step"] for p in series(client, run_id, "loss")] == list(range(1, last + 1))
