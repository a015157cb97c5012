"""``trainer.integrations.pytorch.StagewatchHook`` in a real (tiny) PyTorch loop against the real server.

An operator posts commands over HTTP while the model trains; the test reads back what the server stored: the
series, and each command's acknowledgement (status, step, LR) in the run's decisions. The helpers here serve the
Lightning and Hugging Face integration tests too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainer
from tests.conftest import LiveServer
from trainer.integrations.pytorch import StagewatchHook

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

LR0 = 0.5
FACTOR = 0.5
BATCH = 8
SAMPLES = 64  # 8 steps per epoch
EPOCHS = 3


# --- shared with the other integration tests ----------------------------------------------------------------


def open_run(server: LiveServer, tmp_path: Path, name: str) -> trainer.Run:
    """A run whose commands arrive within a fraction of a second, even while nothing is being logged."""
    return trainer.start_run(
        server.url, name=name, spool_dir=tmp_path / "spool", command_idle_s=0.2, command_wait_s=1.0
    )


def separable_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``SAMPLES`` points in 4-D with labels from a random hyperplane: learnable by a linear model."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 4, generator=generator)
    w = torch.randn(4, generator=generator)
    return x, (x @ w > 0).long()


def post_command(client: httpx.Client, run_id: int, **body: Any) -> int:
    response = client.post(f"/api/v1/runs/{run_id}/commands", json={"reason": "test", **body})
    assert response.status_code == 201, response.text
    command_id: int = response.json()["id"]
    return command_id


def wait_delivered(run: trainer.Run, command_id: int, timeout: float = 10.0) -> None:
    """Blocks until the run's background threads hold the command, so the next step boundary applies it."""
    deadline = time.monotonic() + timeout
    while all(c.id != command_id for c in run.pending_commands()):
        assert time.monotonic() < deadline, f"command {command_id} was not delivered in {timeout}s"
        time.sleep(0.01)


def post_and_deliver(client: httpx.Client, run: trainer.Run, **body: Any) -> int:
    assert run.id is not None
    command_id = post_command(client, run.id, **body)
    wait_delivered(run, command_id)
    return command_id


def series(client: httpx.Client, run_id: int, key: str) -> list[dict[str, Any]]:
    """Every stored point of ``key``, at full resolution, in step order."""
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl", "key": key})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def assert_applied(client: httpx.Client, run_id: int, command_id: int, *, step: int, lr: float) -> None:
    """The server recorded the worker's acknowledgement: applied at ``step`` with ``lr`` in effect."""
    response = client.get(f"/api/v1/runs/{run_id}/decisions")
    assert response.status_code == 200, response.text
    (decision,) = [d for d in response.json() if d["id"] == command_id]
    assert (decision["status"], decision["applied_step"]) == ("applied", step), decision
    assert decision["applied_lr"] == pytest.approx(lr), decision


def stored_keys(client: httpx.Client, run_id: int) -> set[str]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics")
    assert response.status_code == 200, response.text
    return {s["key"] for s in response.json()["series"]}


# --- the plain PyTorch hook ---------------------------------------------------------------------------------


def schedule(s: int) -> float:
    """The LambdaLR factor after ``s`` scheduler steps: closed form from ``base_lrs``, so a scheduler that was
    not patched would put back the undecayed LR at its next step."""
    return 1.0 / (1.0 + 0.1 * s)


class Job:
    """A tiny classifier, SGD, a LambdaLR and the hook, as a user would write them."""

    def __init__(self, run: trainer.Run, **hook_options: Any) -> None:
        torch.manual_seed(0)
        x, y = separable_data()
        self.loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.hook = StagewatchHook(
            run, self.optimizer, self.scheduler, steps_per_epoch=len(self.loader), **hook_options
        )
        self.losses: dict[int, float] = {}  # step -> the loss of the batch that step trained on

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.hook.record(loss)
        self.losses[self.hook.step + 1] = loss.item()  # the test's own bookkeeping, not the user's
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.scheduler.step()


def test_hook_logs_every_step_and_a_decay_survives_the_scheduler_and_a_resume(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    decay_at = 10
    with open_run(server, tmp_path, "pytorch-hook") as run:
        assert run.id is not None
        job = Job(run)
        for _ in range(EPOCHS):
            for x, y in job.loader:
                if job.hook.step == decay_at - 1:  # delivered now: applied at the end of step `decay_at`
                    command_id = post_and_deliver(client, run, action="decay", factor=FACTOR)
                job.train_step(x, y)
        steps = EPOCHS * len(job.loader)
        assert job.hook.step == steps
        # The decay lasts through the 14 LambdaLR steps after it: the schedule goes on from the decayed base.
        assert job.hook.current_lr() == pytest.approx(LR0 * FACTOR * schedule(steps))
        assert job.scheduler.get_last_lr() == [pytest.approx(LR0 * FACTOR * schedule(steps))]
        assert not job.hook.should_stop

        # Resume into fresh objects from a checkpoint: the step count and the decayed schedule go on; nothing is
        # applied again.
        checkpoint = {
            "model": job.model.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "stagewatch": job.hook.state_dict(),
        }
        job.hook.remove()
        resumed = Job(run)
        resumed.model.load_state_dict(checkpoint["model"])
        resumed.optimizer.load_state_dict(checkpoint["optimizer"])
        resumed.scheduler.load_state_dict(checkpoint["scheduler"])
        resumed.hook.load_state_dict(checkpoint["stagewatch"])
        for x, y in resumed.loader:
            resumed.train_step(x, y)
        assert resumed.hook.step == steps + len(resumed.loader)
        assert list(resumed.hook.applier.applied) == [command_id]
        assert run.flush(timeout=15)

    total = steps + len(resumed.loader)
    expected_lr = {s: LR0 * schedule(s - 1) * (FACTOR if s > decay_at else 1.0) for s in range(1, total + 1)}
    lrs = series(client, run.id, "lr")
    assert [p["step"] for p in lrs] == list(range(1, total + 1))  # one point per optimizer step
    assert {p["step"]: p["value"] for p in lrs} == pytest.approx(expected_lr)
    assert [p["epoch"] for p in lrs] == pytest.approx([s / len(job.loader) for s in range(1, total + 1)])
    losses = series(client, run.id, "loss")
    assert {p["step"]: p["value"] for p in losses} == pytest.approx({**job.losses, **resumed.losses})
    assert losses[-1]["value"] < losses[0]["value"]  # it learns
    assert stored_keys(client, run.id) == {"lr", "loss"}

    assert_applied(client, run.id, command_id, step=decay_at, lr=expected_lr[decay_at] * FACTOR)


def test_hook_stops_on_command_averages_between_logged_steps_and_detaches(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    stop_at = 5
    with open_run(server, tmp_path, "pytorch-stop") as run:
        assert run.id is not None
        job = Job(run, log_every=2)
        stopped = False
        for _ in range(EPOCHS):
            for x, y in job.loader:
                if job.hook.step == stop_at - 1:
                    command_id = post_and_deliver(client, run, action="stop")
                job.train_step(x, y)
                if job.hook.should_stop:
                    stopped = True
                    break
            if stopped:
                break
        assert stopped and run.should_stop
        assert job.hook.step == stop_at  # ended early: 5 of 24 steps

        job.hook.remove()
        job.hook.remove()
        job.optimizer.step()
        assert job.hook.step == stop_at  # detached: not counted
        assert run.flush(timeout=15)

    # log_every=2: steps 2 and 4, and 5 where the stop landed; each loss is the mean of what was recorded since
    # the previous logged step.
    lrs = {p["step"]: p["value"] for p in series(client, run.id, "lr")}
    assert lrs == pytest.approx({2: LR0 * schedule(1), 4: LR0 * schedule(3), 5: LR0 * schedule(4)})
    losses = {p["step"]: p["value"] for p in series(client, run.id, "loss")}
    seen = job.losses
    assert losses == pytest.approx({2: (seen[1] + seen[2]) / 2, 4: (seen[3] + seen[4]) / 2, 5: seen[5]})
    assert_applied(client, run.id, command_id, step=stop_at, lr=LR0 * schedule(stop_at - 1))
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "finished"


def test_record_refuses_what_it_cannot_log() -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with StagewatchHook(None, optimizer) as hook:
        with pytest.raises(ValueError, match="one-element"):
            hook.record(torch.ones(3))
        with pytest.raises(TypeError, match="real number"):
            hook.record(acc="high")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="lr_key"):
            hook.record(lr=0.1)
        hook.record(torch.tensor(1.0, requires_grad=True))
        optimizer.step()
        assert hook.step == 1 and hook.current_lr() == 0.1
    optimizer.step()
    assert hook.step == 1
