"""``trainer.integrations.huggingface.StagewatchCallback`` in a real (tiny) ``Trainer.train()`` against the real server.

No download: the model is a plain ``torch.nn.Module`` on synthetic data, and the Hub is switched offline. An
"operator" callback of the test posts a command over HTTP at a chosen step and waits until the run has it, so the
Stagewatch callback applies it at the end of that optimizer step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import trainer
from tests.conftest import LiveServer
from tests.test_integration_pytorch import (
    BATCH,
    EPOCHS,
    FACTOR,
    LR0,
    SAMPLES,
    assert_applied,
    open_run,
    post_and_deliver,
    separable_data,
    series,
    stored_keys,
)
from trainer.integrations.huggingface import StagewatchCallback

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

STEPS_PER_EPOCH = SAMPLES // BATCH
STEPS = EPOCHS * STEPS_PER_EPOCH


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the Hub; huggingface_hub read the variable at import, hence the constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The Trainer's default collator stacks dicts of tensors into a batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.layer(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Operator(TrainerCallback):
    """Posts ``command`` before the optimizer step ``at`` and waits for its delivery: it is applied at ``at``."""

    def __init__(self, client: httpx.Client, run: trainer.Run, at: int, **command: Any) -> None:
        self.client, self.run, self.at, self.command = client, run, at, command
        self.command_id: int | None = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.global_step == self.at - 1 and self.command_id is None:
            self.command_id = post_and_deliver(self.client, self.run, **self.command)


def linear(k: int) -> float:
    """The Trainer's default schedule (linear to 0, no warmup) after ``k`` scheduler steps: a LambdaLR, computed
    from ``base_lrs`` at every step."""
    return (STEPS - k) / STEPS


def make_trainer(output_dir: Path, *callbacks: TrainerCallback, save: bool = False) -> Trainer:
    torch.manual_seed(0)
    x, y = separable_data()
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=16,
        learning_rate=LR0,
        optim="sgd",
        lr_scheduler_type="linear",
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="epoch" if save else "no",
        dataloader_num_workers=0,
    )
    return Trainer(
        model=TinyClassifier(),
        args=args,
        train_dataset=Pairs(x, y),
        eval_dataset=Pairs(x[:16], y[:16]),
        callbacks=list(callbacks),
    )


def test_callback_logs_the_trainer_logs_applies_a_decay_and_resumes_from_a_checkpoint(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    decay_at = 10
    resume_at = 2 * STEPS_PER_EPOCH  # checkpoint-16, saved after the decay
    output_dir = tmp_path / "out"
    with open_run(server, tmp_path, "huggingface") as run:
        assert run.id is not None
        watch = StagewatchCallback(run)
        operator = Operator(client, run, decay_at, action="decay", factor=FACTOR)
        hf = make_trainer(output_dir, operator, watch, save=True)
        hf.train()
        assert hf.state.global_step == STEPS
        assert not watch.should_stop
        # The LambdaLR's base LR carries the decay, so every step after it stayed decayed (see the series).
        assert hf.lr_scheduler is not None
        assert hf.lr_scheduler.base_lrs == [pytest.approx(LR0 * FACTOR)] * 2  # groups with and without decay

        # The job "crashes" and resumes from checkpoint-16: rewind the run to it, then train the last epoch again.
        assert run.flush(timeout=15)
        response = client.post(f"/api/v1/runs/{run.id}/rewind", json={"step": resume_at, "reason": "resume"})
        assert response.status_code == 200, response.text
        resumed_watch = StagewatchCallback(run)
        resumed = make_trainer(output_dir, resumed_watch, save=True)
        resumed.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{resume_at}"))
        assert resumed.state.global_step == STEPS
        assert resumed_watch.applier is not None and list(resumed_watch.applier.applied) == [operator.command_id]
        assert run.flush(timeout=15)

    expected_lr = {s: LR0 * linear(s - 1) * (FACTOR if s > decay_at else 1.0) for s in range(1, STEPS + 1)}
    lrs = series(client, run.id, "learning_rate")
    assert [p["step"] for p in lrs] == list(range(1, STEPS + 1))  # one point per optimizer step
    assert {p["step"]: p["value"] for p in lrs} == pytest.approx(expected_lr)
    assert [p["epoch"] for p in lrs] == pytest.approx([s / STEPS_PER_EPOCH for s in range(1, STEPS + 1)])
    assert [p["step"] for p in series(client, run.id, "loss")] == list(range(1, STEPS + 1))
    evals = series(client, run.id, "eval_loss")
    assert [(p["step"], p["epoch"]) for p in evals] == [(8, 1.0), (16, 2.0), (24, 3.0)]
    assert evals[-1]["value"] < evals[0]["value"]  # it learns
    keys = stored_keys(client, run.id)
    assert {"loss", "grad_norm", "learning_rate", "eval_loss", "train_loss"} <= keys
    assert "epoch" not in keys  # sent as the points' epoch

    assert operator.command_id is not None
    # Applied after the Trainer's scheduler.step(): the decayed LR is the one step decay_at + 1 uses.
    assert_applied(client, run.id, operator.command_id, step=decay_at, lr=expected_lr[decay_at + 1])


def test_callback_stops_training_on_a_stop_command(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    stop_at = 5
    with open_run(server, tmp_path, "huggingface-stop") as run:
        assert run.id is not None
        watch = StagewatchCallback(run)
        operator = Operator(client, run, stop_at, action="stop")
        hf = make_trainer(tmp_path / "out", operator, watch)
        hf.train()
        assert hf.state.global_step == stop_at  # of 24
        assert watch.should_stop and run.should_stop
        assert run.flush(timeout=15)

    assert [p["step"] for p in series(client, run.id, "learning_rate")] == list(range(1, stop_at + 1))
    assert operator.command_id is not None
    assert_applied(client, run.id, operator.command_id, step=stop_at, lr=LR0 * linear(stop_at))


def test_restoring_callback_states_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        Trainer(
            model=TinyClassifier(),
            args=TrainingArguments(
                output_dir=str(tmp_path), use_cpu=True, report_to=[], restore_callback_states_from_checkpoint=True
            ),
            callbacks=[StagewatchCallback(None)],
        )
