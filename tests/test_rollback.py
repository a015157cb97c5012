"""Stage checkpoints and undoing a premature decay, end to end: a real server (SQLite file and PostgreSQL), the
real client, real torch training.

A decay applied by ``CommandApplier`` saves a stage checkpoint first and reports it; the server lists it. An
operator's rollback to it is loaded at a step boundary -- the parameters and optimizer state bit-identical to the
saved ones, the pre-decay LR back -- the run is rewound on the server (the abandoned points in the audit log),
the decay is marked ``rolled_back``, the detector is held, and the job logs the steps again and finishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import trainer
from server.db import make_engine, make_session_factory, transaction
from server.models import DetectorState
from server.settings import Settings
from tests.conftest import LiveServer, free_port
from tests.test_trainer_outage import LiveServerOnPort
from trainer.loop import EpochStats, fit
from trainer.recipes.mnist1d import load_data, make_task
from trainer.torch import AppliedCommand, CommandApplier

pytestmark = pytest.mark.slow

LR0 = 0.1
BACKOFF = 7


class Loop:
    """A small real training loop with momentum SGD (optimizer state to restore) and a StepLR scheduler."""

    def __init__(self, run: trainer.Run, checkpoint_dir: Path) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR0, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1000, gamma=0.5)
        self.applier = CommandApplier(
            run, self.optimizer, self.scheduler, model=self.model, checkpoint_dir=checkpoint_dir
        )
        self.run = run
        self.phase = 0.0  # logged with every step: different before and after the rollback, so a step logged
        # twice without the rewind would be a conflict (409)
        self.x = torch.randn(16, 4)
        self.y = torch.randn(16, 1)

    def step(self, step: int) -> list[AppliedCommand]:
        lr = self.applier.current_lr()  # the rate this update uses: a decay applied at N shows from N + 1
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.scheduler.step()
        self.run.log({"loss": loss.item(), "lr": lr, "phase": self.phase}, step=step)
        return self.applier.step(step)

    def until_applied(self, start: int, timeout: float = 20.0) -> tuple[AppliedCommand, int]:
        """Steps from ``start`` until a command is applied; returns it and the step it was applied at."""
        deadline = time.monotonic() + timeout
        step = start
        while True:
            assert time.monotonic() < deadline, f"no command applied after {step - start} steps"
            applied = self.step(step)
            if applied:
                (done,) = applied
                return done, step
            step += 1
            time.sleep(0.005)  # a training step's pace: the command arrives by long-poll meanwhile


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def detector_state(migrated_url: str) -> Iterator[Callable[[int], DetectorState | None]]:
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)

    def read(run_id: int) -> DetectorState | None:
        with transaction(sessions) as session:
            row = session.get(DetectorState, run_id)
            if row is not None:
                session.expunge(row)
            return row

    yield read
    engine.dispose()


def series(client: httpx.Client, run_id: int, key: str) -> dict[int, float]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics", params={"key": key, "max_points": 10_000})
    assert response.status_code == 200, response.text
    (found,) = response.json()["series"]
    return dict(zip(found["steps"], found["values"], strict=True))


def test_stage_checkpoint_then_rollback_restores_the_weights_and_rewinds_the_run(
    server: LiveServer, client: httpx.Client, tmp_path: Path, detector_state: Callable[[int], DetectorState | None]
) -> None:
    ckpt_dir = tmp_path / "ckpts"
    with trainer.start_run(server.url, spool_dir=tmp_path / "spool", command_wait_s=1.0) as run:
        assert run.id is not None
        loop = Loop(run, ckpt_dir)
        for step in range(1, 6):
            loop.step(step)
        decay = client.post(f"/api/v1/runs/{run.id}/commands", json={"action": "decay", "factor": 0.1})
        assert decay.status_code == 201, decay.text
        done, at = loop.until_applied(6)
        assert (done.id, done.action, done.status, done.step) == (decay.json()["id"], "decay", "applied", at)
        assert done.lr == pytest.approx(LR0 * 0.1)

        # The stage checkpoint: written before the decay, listed by the server with its decision and stage.
        path = ckpt_dir / f"stage-end-step{at}.pt"
        assert path.is_file()
        saved = torch.load(path, weights_only=False)
        assert saved["step"] == at and saved["optimizer"]["param_groups"][0]["lr"] == LR0
        assert run.flush(15)

        def checkpoints() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = client.get(f"/api/v1/runs/{run.id}/checkpoints").json()["data"]
            return found

        wait_for(lambda: all(c["stage"] is not None for c in checkpoints()))  # stages follow detection passes
        listed = checkpoints()
        assert [(c["step"], c["uri"], c["decision_id"], c["stage"], c["lr"]) for c in listed] == [
            (at, str(path.resolve()), done.id, 0, LR0)
        ]
        assert listed[0]["metrics"]["lr"] == LR0 and listed[0]["metrics"]["phase"] == 0.0

        # Train on at the decayed LR, every point on the server.
        for step in range(at + 1, at + 11):
            loop.step(step)
        assert run.flush(15)
        assert max(series(client, run.id, "phase")) == at + 10

        rollback = client.post(
            f"/api/v1/runs/{run.id}/rollback",
            json={"checkpoint_id": listed[0]["id"], "backoff": {"steps": BACKOFF}, "reason": "premature"},
        )
        assert rollback.status_code == 201, rollback.text
        assert rollback.json()["action"] == "rollback"
        assert rollback.json()["checkpoint"]["step"] == at
        undone, applied_at = loop.until_applied(at + 11)
        loop.phase = 1.0
        assert (undone.id, undone.action, undone.status, undone.step) == (
            rollback.json()["id"],
            "rollback",
            "applied",
            at,
        )
        assert loop.applier.rewound_to == at

        # Bit-identical to the checkpoint: every parameter, every optimizer buffer, the pre-decay LR.
        for name, tensor in loop.model.state_dict().items():
            assert torch.equal(tensor, saved["model"][name]), name
        optimizer_state = loop.optimizer.state_dict()
        for key, buffers in optimizer_state["state"].items():
            for name, tensor in buffers.items():
                assert torch.equal(tensor, saved["optimizer"]["state"][key][name]), (key, name)
        assert loop.applier.current_lr() == LR0
        assert loop.scheduler.state_dict() == saved["scheduler"]

        # The job continues from the checkpoint's step, logging those steps again (other values: "phase").
        for step in range(at + 1, at + 21):
            loop.step(step)
        assert run.flush(15)
        assert not (tmp_path / "spool" / "rejected.jsonl").exists()  # no step conflicted
        run_id = run.id
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"

    phase = series(client, run_id, "phase")
    assert phase == {s: (0.0 if s <= at else 1.0) for s in range(1, at + 21)}
    rewinds = client.get(f"/api/v1/runs/{run_id}/rewinds").json()["data"]
    assert [r["step"] for r in rewinds] == [at]
    assert rewinds[0]["removed"]["phase"] == applied_at - at  # the abandoned steps, in the audit log
    event = client.get(f"/api/v1/runs/{run_id}/events/{rewinds[0]['event_id']}").json()
    assert [p[0] for p in event["payload"]["points"]["phase"]] == list(range(at + 1, applied_at + 1))
    assert {p[1] for p in event["payload"]["points"]["phase"]} == {0.0}

    decisions = {d["id"]: d for d in client.get(f"/api/v1/runs/{run_id}/decisions").json()}
    assert decisions[done.id]["status"] == "rolled_back"
    assert [h["status"] for h in decisions[done.id]["history"]][-2:] == ["applied", "rolled_back"]
    assert decisions[undone.id]["status"] == "applied" and decisions[undone.id]["applied_step"] == at
    assert decisions[undone.id]["evidence"]["rewind_event_id"] == rewinds[0]["event_id"]
    held = detector_state(run_id)
    assert held is not None and held.hold_until_step == at + BACKOFF
    kinds = [e["kind"] for e in client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 200}).json()["data"]]
    assert "detector.held" in kinds and "decision.rolled_back" in kinds


def test_a_rollback_that_arrives_before_an_outage_waits_for_the_server_and_keeps_every_step_once(
    settings: Settings, tmp_path: Path
) -> None:
    """The rollback is delivered, then the server goes down with points not yet sent: the job must not load the
    checkpoint while the server lacks points logged before it (they would land after the rewind, as if logged
    after the rollback). It trains on; once the server is back the rollback applies, and every step is stored
    once with the values of the trajectory it belongs to."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = LiveServerOnPort(settings, port).__enter__()
    try:
        run = trainer.start_run(
            url, spool_dir=tmp_path / "spool", retry_max_s=0.3, command_wait_s=1.0, command_idle_s=0.3
        )
        with run, httpx.Client(base_url=url, timeout=10) as client:
            assert run.id is not None
            loop = Loop(run, tmp_path / "ckpts")
            loop.applier.rollback_flush_s, loop.applier.rollback_retry_s = 0.3, 0.5
            for step in range(1, 4):
                loop.step(step)
            assert client.post(f"/api/v1/runs/{run.id}/commands", json={"action": "decay", "factor": 0.1}).is_success
            _, at = loop.until_applied(4)
            for step in range(at + 1, at + 6):
                loop.step(step)
            assert run.flush(15)
            (checkpoint,) = client.get(f"/api/v1/runs/{run.id}/checkpoints").json()["data"]
            rollback = client.post(f"/api/v1/runs/{run.id}/rollback", json={"checkpoint_id": checkpoint["id"]})
            assert rollback.status_code == 201, rollback.text
            wait_for(lambda: [c.id for c in run.pending_commands()] == [rollback.json()["id"]])  # delivered
            first.__exit__(None, None, None)

            down_from = at + 6
            for step in range(down_from, down_from + 5):  # each logs a point first: the server lacks it
                assert loop.step(step) == [], "the rollback was applied while the server lacked points"
            with LiveServerOnPort(settings, port):
                undone, applied_at = loop.until_applied(down_from + 5)
                assert (undone.action, undone.status, undone.step) == ("rollback", "applied", at)
                loop.phase = 1.0
                for step in range(at + 1, at + 16):
                    loop.step(step)
                assert run.flush(15)
                phase = series(client, run.id, "phase")
                rewinds = client.get(f"/api/v1/runs/{run.id}/rewinds").json()["data"]
                statuses = [d["status"] for d in client.get(f"/api/v1/runs/{run.id}/decisions").json()]
    finally:
        first.__exit__(None, None, None)
    assert phase == {s: (0.0 if s <= at else 1.0) for s in range(1, at + 16)}
    assert [(r["step"], r["removed"]["phase"]) for r in rewinds] == [(at, applied_at - at)]  # all of them stored
    assert statuses == ["rolled_back", "applied"]
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()


def test_rollback_holds_a_live_detector_that_does_not_propose_the_undone_decay_again(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """A plateau detector in auto mode decays; after the rollback to before that decay it is rebuilt without
    acting on the past and held: no new decision until the backoff has passed."""
    # "phase" is flat: the detector decides after 4 points; its cooldown keeps it from deciding again after the decay.
    detector = {"name": "plateau", "metric": "phase", "params": {"patience": 3, "cooldown": 100}}
    with trainer.start_run(
        server.url, spool_dir=tmp_path / "spool", command_wait_s=1.0, mode="auto", detector=detector
    ) as run:
        assert run.id is not None
        loop = Loop(run, tmp_path / "ckpts")
        done, at = loop.until_applied(1)
        assert done.action == "decay"
        assert run.flush(15)
        (checkpoint,) = client.get(f"/api/v1/runs/{run.id}/checkpoints").json()["data"]
        for step in range(at + 1, at + 6):
            loop.step(step)
        assert run.flush(15)
        body = {"checkpoint_id": checkpoint["id"], "backoff": {"steps": 1000}}
        assert client.post(f"/api/v1/runs/{run.id}/rollback", json=body).status_code == 201
        loop.phase = 1.0
        undone, _ = loop.until_applied(at + 6)
        assert undone.action == "rollback" and loop.applier.current_lr() == LR0
        for step in range(at + 1, at + 40):
            assert loop.step(step) == [], "the held detector decided again"
        assert run.sync_detection(20)
        run_id = run.id
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert [(d["action"], d["status"]) for d in decisions] == [("decay", "rolled_back"), ("rollback", "applied")]


def test_checkpoint_reports_are_idempotent_and_rollback_refuses_bad_targets(client: httpx.Client) -> None:
    run_id = client.post("/api/v1/runs", json={"name": "a"}).json()["id"]
    other = client.post("/api/v1/runs", json={"name": "b"}).json()["id"]
    batch = {"points": [{"key": "loss", "step": s, "value": 1.0 / s} for s in range(1, 21)]}
    assert client.post(f"/api/v1/runs/{run_id}/metrics", json=batch).status_code == 200
    assert client.post(f"/api/v1/runs/{other}/metrics", json=batch).status_code == 200

    body: dict[str, Any] = {"step": 10, "uri": "s3://bucket/ckpt-10.pt", "metrics": {"acc": "NaN"}}
    first = client.post(f"/api/v1/runs/{run_id}/checkpoints", json=body)
    assert first.status_code == 201, first.text
    assert first.json()["metrics"] == {"acc": "NaN"} and first.json()["stage"] is None
    again = client.post(f"/api/v1/runs/{run_id}/checkpoints", json=body)
    assert again.status_code == 200 and again.json() == first.json()
    later = client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": 30, "uri": "/ckpt/30.pt"})
    assert later.status_code == 201
    theirs = client.post(f"/api/v1/runs/{other}/checkpoints", json={"step": 5, "uri": "/other/5.pt"}).json()
    listed = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["data"]
    assert [c["step"] for c in listed] == [10, 30]
    assert listed[1]["metrics"] == {"loss": 1.0 / 20}  # none reported: each key's last value by its step

    def rollback(**fields: Any) -> httpx.Response:
        return client.post(f"/api/v1/runs/{run_id}/rollback", json=fields)

    wrong_run = rollback(checkpoint_id=theirs["id"])
    assert wrong_run.status_code == 422 and "checkpoint_id" in wrong_run.json()["detail"]
    assert f"belongs to run {other}" in wrong_run.json()["detail"]
    ahead = rollback(checkpoint_id=later.json()["id"])
    assert ahead.status_code == 422 and "after the run's current step 20" in ahead.json()["detail"]
    missing = rollback(checkpoint_id=999_999)
    assert missing.status_code == 422 and "no checkpoint 999999" in missing.json()["detail"]
    assert rollback(checkpoint_id="1").status_code == 422
    no_epochs = rollback(checkpoint_id=first.json()["id"], backoff={"epochs": 2})
    assert no_epochs.status_code == 422 and "backoff" in no_epochs.json()["detail"]
    bad_decision = client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": 1, "uri": "/x", "decision_id": 77})
    assert bad_decision.status_code == 422 and "decision_id" in bad_decision.json()["detail"]
    assert client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": -1, "uri": "/x"}).status_code == 422
    assert client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": 1, "uri": ""}).status_code == 422

    queued = rollback(checkpoint_id=first.json()["id"])
    assert queued.status_code == 201
    twice = rollback(checkpoint_id=first.json()["id"])
    assert twice.status_code == 409 and "already has a rollback waiting" in twice.json()["detail"]
    commands = client.get(f"/api/v1/runs/{run_id}/commands").json()["data"]
    assert [(c["action"], c["checkpoint"]["uri"]) for c in commands] == [("rollback", "s3://bucket/ckpt-10.pt")]


def test_rollback_needs_an_operator(secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    with httpx.Client(base_url=url, timeout=30) as client:
        worker = {"Authorization": f"Bearer {tokens['worker']}"}
        run_id = client.post("/api/v1/runs", json={"name": "r"}, headers=worker).json()["id"]
        client.post(
            f"/api/v1/runs/{run_id}/metrics", json={"points": [{"key": "l", "step": 3, "value": 1.0}]}, headers=worker
        )
        checkpoint = client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": 3, "uri": "/c"}, headers=worker)
        assert checkpoint.status_code == 201
        body = {"checkpoint_id": checkpoint.json()["id"]}
        for role in ("viewer", "worker"):
            denied = client.post(
                f"/api/v1/runs/{run_id}/rollback", json=body, headers={"Authorization": f"Bearer {tokens[role]}"}
            )
            assert denied.status_code == 403, (role, denied.text)
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
        assert (
            client.post(f"/api/v1/runs/{run_id}/checkpoints", json={"step": 3, "uri": "/d"}, headers=viewer).status_code
            == 403
        )
        assert len(client.get(f"/api/v1/runs/{run_id}/checkpoints", headers=viewer).json()["data"]) == 1
        operator = {"Authorization": f"Bearer {tokens['operator']}"}
        assert client.post(f"/api/v1/runs/{run_id}/rollback", json=body, headers=operator).status_code == 201


def test_fit_on_mnist1d_writes_stage_checkpoints_and_rolls_back(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    """``trainer.loop.fit`` (what ``stagewatch train --checkpoint-dir`` runs) on a real MNIST-1D CNN: an operator's
    decay after epoch 2 saves a stage checkpoint; a rollback to it after epoch 4 brings the job back to that step,
    which trains the remaining epochs and finishes."""
    data = load_data(num_samples=400)
    task = make_task(data, batch_size=50, seed=0, channels=8)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    epochs = 6
    seen: list[EpochStats] = []

    with trainer.start_run(server.url, spool_dir=tmp_path / "spool", command_wait_s=1.0) as run:
        assert run.id is not None
        run_id = run.id

        def on_epoch(stats: EpochStats) -> None:
            seen.append(stats)
            if len(seen) == 2:
                body = {"action": "decay", "factor": 0.1}
                assert client.post(f"/api/v1/runs/{run_id}/commands", json=body).status_code == 201
            if len(seen) == 4:
                assert run.flush(15)
                (checkpoint,) = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["data"]
                body = {"checkpoint_id": checkpoint["id"], "reason": "decayed too early"}
                assert client.post(f"/api/v1/runs/{run_id}/rollback", json=body).status_code == 201

        result = fit(
            task,
            run,
            schedule="constant",
            epochs=epochs,
            optimizer=optimizer,
            sync_detection=True,  # the commands are fetched at the end of the epoch they were posted in
            on_epoch=on_epoch,
            checkpoint_dir=tmp_path / "ckpts",
        )
        assert run.flush(15)
    per_epoch = task.steps_per_epoch
    decay_step = 2 * per_epoch + 1  # applied after the first update of epoch 3
    assert result.epochs == epochs and result.steps == epochs * per_epoch and not result.stopped
    assert result.lr == 0.05  # the decay was undone
    # Epochs 3 and 4 ran twice: once after the decay, once after the rollback.
    assert [s.epoch for s in seen] == [1, 2, 3, 4, 3, 4, 5, 6]
    (checkpoint,) = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["data"]
    assert checkpoint["step"] == decay_step and Path(checkpoint["uri"]).is_file()
    assert checkpoint["stage"] == 0 and checkpoint["lr"] == 0.05
    assert "epoch/train_loss" in checkpoint["metrics"]
    lrs = series(client, run_id, "lr")
    assert set(lrs) == set(range(1, epochs * per_epoch + 1)) and set(lrs.values()) == {0.05}
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert [(d["action"], d["status"]) for d in decisions] == [("decay", "rolled_back"), ("rollback", "applied")]
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()
