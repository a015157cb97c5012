"""Commands from the server applied by a real training loop, exactly once, against the real app over HTTP.

A real SGD optimizer and StepLR scheduler; the command is created by an operator through REST, reaches the
run's background threads, is applied by ``trainer.torch.CommandApplier`` at a step boundary and acknowledged.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import trainer
from server.db import make_engine, make_session_factory, transaction
from server.models import Decision
from server.settings import Settings
from tests.conftest import LiveServer, free_port
from tests.test_trainer_outage import LiveServerOnPort
from trainer.torch import AppliedCommand, CommandApplier

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

LR0 = 0.1
GAMMA = 0.5
STEP_SIZE = 10


def scheduled(step: int) -> float:
    """StepLR's LR in effect after ``scheduler.step()`` at ``step``, with no command."""
    return float(LR0 * GAMMA ** ((step + 1) // STEP_SIZE))


class Loop:
    """A tiny real training loop: model, SGD, StepLR, the applier; records the LR in effect per step."""

    def __init__(self, run: trainer.Run | None, schedule: str = "step") -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR0)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        if schedule == "step":  # chainable: its next LR is computed from the group's current one
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=STEP_SIZE, gamma=GAMMA)
        else:  # closed form from base_lrs: undoes a change of the param groups alone at its next step
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda epoch: GAMMA ** (epoch // STEP_SIZE)
            )
        self.applier = CommandApplier(run, self.optimizer, self.scheduler)
        self.run = run
        self.lrs: dict[int, float] = {}
        self.x = torch.randn(8, 4)
        self.y = torch.randn(8, 1)

    def step(self, step: int) -> list[AppliedCommand]:
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.scheduler.step()
        applied = self.applier.step(step)
        lr = self.applier.current_lr()
        self.lrs[step] = lr
        if self.run is not None:
            self.run.log({"loss": loss.item(), "lr": lr}, step=step)
        return applied

    def steps_until(self, start: int, done: Callable[[], bool], timeout: float = 15.0) -> int:
        """Steps from ``start`` (a few ms apart) until ``done()``; returns the next step."""
        deadline = time.monotonic() + timeout
        step = start
        while not done():
            assert time.monotonic() < deadline, f"not done after {step - start} steps"
            self.step(step)
            step += 1
            time.sleep(0.01)
        return step

    def checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "stagewatch": self.applier.state_dict(),
            },
            buffer,
        )
        return buffer.getvalue()

    def restore(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.applier.load_state_dict(state["stagewatch"])


def post_command(client: httpx.Client, run_id: int, **body: Any) -> int:
    response = client.post(f"/api/v1/runs/{run_id}/commands", json={"reason": "test", **body})
    assert response.status_code == 201, response.text
    command_id: int = response.json()["id"]
    return command_id


@pytest.fixture
def stored(migrated_url: str) -> Iterator[Callable[[int], tuple[str, int | None, float | None]]]:
    """Reads a command's (status, applied_step, applied_lr) straight from the database."""
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)

    def read(command_id: int) -> tuple[str, int | None, float | None]:
        with transaction(sessions) as session:
            command = session.get(Decision, command_id)
            assert command is not None
            return command.status, command.applied_step, command.applied_lr

    yield read
    engine.dispose()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize("schedule", ["step", "lambda"])
def test_decay_is_applied_once_and_survives_the_scheduler_and_a_checkpoint(
    server: LiveServer, client: httpx.Client, stored, tmp_path: Path, schedule: str
):
    with trainer.start_run(server.url, spool_dir=tmp_path, command_wait_s=1.0) as run:
        assert run.id is not None
        loop = Loop(run, schedule)
        for step in range(5):
            assert loop.step(step) == []
        assert loop.lrs == {s: scheduled(s) for s in range(5)}
        command_id = post_command(client, run.id, action="decay", factor=0.1)
        applied: list[AppliedCommand] = []
        step = 5
        deadline = time.monotonic() + 15
        while not applied:
            assert time.monotonic() < deadline, "the command never arrived"
            applied = loop.step(step)
            step += 1
            time.sleep(0.01)
        (done,) = applied
        at = step - 1
        assert (done.id, done.action, done.status, done.step) == (command_id, "decay", "applied", at)
        assert done.lr == pytest.approx(scheduled(at) * 0.1)
        # The decayed LR survives StepLR's own decays (several step_size boundaries later), applied once.
        for s in range(step, at + 3 * STEP_SIZE):
            assert loop.step(s) == []
        assert all(loop.lrs[s] == pytest.approx(scheduled(s)) for s in range(at))
        assert all(loop.lrs[s] == pytest.approx(scheduled(s) * 0.1) for s in range(at, at + 3 * STEP_SIZE))
        assert run.pending_commands() == []
        assert run.flush(timeout=15)
        assert stored(command_id) == ("applied", at, done.lr)

        # Resume into fresh objects from a checkpoint: the LR and the schedule continue; nothing is re-applied.
        blob = loop.checkpoint()
        last = at + 3 * STEP_SIZE
        fresh = Loop(run, schedule)
        fresh.restore(blob)
        assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(loop.lrs[last - 1])
        for s in range(last, last + 2 * STEP_SIZE):
            assert fresh.step(s) == []
        assert all(fresh.lrs[s] == pytest.approx(scheduled(s) * 0.1) for s in range(last, last + 2 * STEP_SIZE))
        assert list(fresh.applier.applied) == [command_id]
        assert run.flush(timeout=15)
    assert stored(command_id) == ("applied", at, done.lr)


def test_set_lr_and_stop(server: LiveServer, client: httpx.Client, stored, tmp_path: Path):
    with trainer.start_run(server.url, spool_dir=tmp_path) as run:
        assert run.id is not None
        loop = Loop(run)
        loop.step(0)
        set_id = post_command(client, run.id, action="set_lr", lr=0.03)
        step = loop.steps_until(1, lambda: set_id in loop.applier.applied)
        at = step - 1
        assert loop.lrs[at] == 0.03 and loop.lrs[at - 1] == scheduled(at - 1)
        assert not run.should_stop and not loop.applier.should_stop
        stop_id = post_command(client, run.id, action="stop", reason="enough")
        step = loop.steps_until(step, lambda: loop.applier.should_stop)
        stopped_at = step - 1
        assert run.should_stop
        assert loop.applier.applied[stop_id].step == stopped_at
        # StepLR keeps the set LR as its new base: 0.03, then halved at the next boundary.
        for s in range(at, stopped_at + 1):
            assert loop.lrs[s] == pytest.approx(0.03 * GAMMA ** ((s + 1) // STEP_SIZE - (at + 1) // STEP_SIZE))
        assert run.flush(timeout=15)
    assert stored(set_id) == ("applied", at, 0.03)
    assert stored(stop_id) == ("applied", stopped_at, loop.lrs[stopped_at])
    # should_stop is part of the checkpoint.
    fresh = Loop(None)
    fresh.restore(loop.checkpoint())
    assert fresh.applier.should_stop


def test_server_restart_between_delivery_and_ack(settings: Settings, stored, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = LiveServerOnPort(settings, port).__enter__()
    try:
        # It closes after the second server is gone: close_timeout_s bounds its retries of the final status.
        run = trainer.start_run(
            url, spool_dir=tmp_path, retry_max_s=0.5, command_wait_s=1.0, command_idle_s=0.3, close_timeout_s=1
        )
        with run:
            assert run.id is not None
            loop = Loop(run)
            for step in range(5):
                loop.step(step)
            with httpx.Client(base_url=url, timeout=10) as client:
                command_id = post_command(client, run.id, action="decay", factor=0.5)
            wait_for(lambda: [c.id for c in run.pending_commands()] == [command_id])  # delivered, not applied
            assert stored(command_id)[0] == "delivered"
            first.__exit__(None, None, None)
            for step in range(5, 40):  # the server is down: applied at step 5, the ack waits
                loop.step(step)
            assert list(loop.applier.applied) == [command_id] and loop.applier.applied[command_id].step == 5
            assert not run.flush(timeout=0.5)
            with LiveServerOnPort(settings, port):
                assert run.flush(timeout=20)
                assert stored(command_id) == ("applied", 5, pytest.approx(scheduled(5) * 0.5))
                for step in range(40, 45):
                    assert loop.step(step) == []
    finally:
        first.__exit__(None, None, None)
    lrs = [loop.lrs[s] for s in range(45)]
    assert all(lrs[s] == pytest.approx(scheduled(s) * (0.5 if s >= 5 else 1.0)) for s in range(45))


def test_crash_before_ack_then_resume_from_checkpoint_acks_without_reapplying(
    settings: Settings, stored, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="trainer")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with LiveServerOnPort(settings, port) as first:
        run = trainer.start_run(
            url, spool_dir=tmp_path / "a", retry_max_s=0.5, close_timeout_s=0.5, command_wait_s=1.0
        ).__enter__()
        assert run.id is not None
        run_id = run.id
        loop = Loop(run)
        for step in range(3):
            loop.step(step)
        with httpx.Client(base_url=url, timeout=10) as client:
            command_id = post_command(client, run_id, action="decay", factor=0.25)
        wait_for(lambda: bool(run.pending_commands()))
    assert not first.thread.is_alive()
    for step in range(3, 8):  # applied at step 3 while the server is down; checkpoint at step 7
        loop.step(step)
    blob = loop.checkpoint()
    lr_at_checkpoint = loop.lrs[7]
    run.close("failed")  # the job dies: its ack never reached the server
    assert any("closed before the server acknowledged command" in r.getMessage() for r in caplog.records)

    with LiveServerOnPort(settings, port):
        assert stored(command_id)[0] == "delivered"
        with trainer.start_run(url, run_id=run_id, spool_dir=tmp_path / "b") as resumed:
            fresh = Loop(resumed)
            fresh.restore(blob)
            assert fresh.applier.current_lr() == lr_at_checkpoint
            # The resumed run gets the unacknowledged command again; the applier only acknowledges it.
            step = fresh.steps_until(8, lambda: stored(command_id)[0] == "applied")
            for s in range(step, 30):
                assert fresh.step(s) == []
            assert list(fresh.applier.applied) == [command_id]
            assert resumed.flush(timeout=15)
    assert stored(command_id) == ("applied", 3, pytest.approx(scheduled(3) * 0.25))
    assert all(fresh.lrs[s] == pytest.approx(scheduled(s) * 0.25) for s in range(8, 30))
