"""The closed loop end to end: live detection on the server, each mode, each operator action, restarts.

The worker is real -- ``trainer.start_run`` with its background sender and long-poll, and a
``CommandApplier`` on a real torch SGD optimizer -- but its per-epoch loss follows a known staged curve (see
:class:`CurveWorker`), so that when the detector decides is known: with ``PARAMS`` a stage is judged over
about 8 epochs after it began. The worker and the server are synchronised at each epoch end
(:meth:`CurveWorker.settle`), so every test is deterministic.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import trainer
from server.app import create_app
from server.models import Decision, Run
from server.settings import Settings
from server.store.decisions import auto_approve_at
from tests.conftest import LiveServer
from trainer.torch import CommandApplier

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

STEPS_PER_EPOCH = 5
LR = 0.1
# Small stages on a noise-free curve: a stage is judged over 6 points after it began, on raw points (no running
# mean: there is no noise to average) against 20 % of its pace; each stage then lasts 8 epochs.
PARAMS = {"min_stage": 6, "confirm": 1, "min_window_blocks": 3, "max_decays": 2, "smooth": 1, "rho": 0.2}
DETECTOR = {"name": "autodecay", "metric": "epoch/train_loss", "params": PARAMS}


def floor(lr: float) -> float:
    """The level a stage settles at: a smaller LR reaches a lower loss (the paper's mechanism)."""
    return 0.8 + 0.3 * math.log10(lr)


class CurveWorker:
    """A training job whose per-epoch loss is ``floor(lr) + 0.5·exp(-(epochs since the LR changed)/1.5)``.

    Each epoch makes ``STEPS_PER_EPOCH`` optimizer steps (logging ``lr`` per step, applying commands after
    each) and logs ``epoch/train_loss`` at its end.
    """

    def __init__(self, server: LiveServer, run: trainer.Run) -> None:
        self.server = server
        self.run = run
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([self.weight], lr=LR)
        self.applier = CommandApplier(run, self.optimizer)
        self.step = 0
        self.epoch = 0
        self.stage_start = 0
        self.applied: list[Any] = []

    @property
    def lr(self) -> float:
        return self.applier.current_lr()

    def train_epoch(self) -> bool:
        """One epoch; False once a stop command has been applied."""
        for _ in range(STEPS_PER_EPOCH):
            self.step += 1
            self.run.log({"lr": self.lr}, step=self.step, epoch=self.step / STEPS_PER_EPOCH)
            self.weight.grad = torch.ones(1)
            self.optimizer.step()
            done = self.applier.step(self.step)
            self.applied += done
            if any(c.action in ("decay", "set_lr") for c in done):
                self.stage_start = self.epoch
            if self.applier.should_stop:
                return False
        self.epoch += 1
        loss = floor(self.lr) + 0.5 * math.exp(-(self.epoch - self.stage_start) / 1.5)
        self.run.log({"epoch/train_loss": loss}, step=self.step, epoch=float(self.epoch))
        self.settle()
        return True

    def settle(self) -> None:
        """Waits until the server has seen everything logged and the worker holds every approved command."""
        assert self.run.flush(timeout=10)
        live = self.server.app.state.stagewatch.live
        assert live.wait_idle(timeout=10)
        wanted = {d["id"] for d in decisions(self.server, self.run.id) if d["status"] in ("approved", "delivered")}
        deadline = time.monotonic() + 10
        while wanted - {c.id for c in self.run.pending_commands()} - set(self.applier.applied):
            assert time.monotonic() < deadline, f"commands {wanted} never reached the worker"
            time.sleep(0.005)

    def train_until(self, condition: Any, max_epochs: int = 60) -> None:
        for _ in range(max_epochs):
            if condition():
                return
            if not self.train_epoch():
                return
        raise AssertionError(f"condition not met within {max_epochs} epochs")


def decisions(server: LiveServer, run_id: int | None) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/v1/runs/{run_id}/decisions")
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def start(server: LiveServer, tmp_path: Path, mode: str, **fields: Any) -> trainer.Run:
    detector = fields.pop("detector", DETECTOR)
    run = trainer.start_run(
        server.url, name=f"{mode}-run", spool_dir=tmp_path / "spool", detector=detector, mode=mode, **fields
    )
    return run


def statuses(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(h["status"], h["actor"]) for h in history]


def lrs(client: httpx.Client, run_id: int | None) -> list[float]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl", "key": "lr"})
    assert response.status_code == 200, response.text
    return [json.loads(line)["value"] for line in response.text.splitlines()]


# --- modes ----------------------------------------------------------------------------------------------------


def test_auto_mode_decays_at_each_stage_end_then_stops(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with start(server, tmp_path, "auto") as run:
        worker = CurveWorker(server, run)
        while worker.train_epoch():
            assert worker.epoch < 60, "the detector never stopped the run"
    made = decisions(server, run.id)
    assert [d["action"] for d in made] == ["decay", "decay", "stop"]
    assert all(d["status"] == "applied" for d in made)
    for d in made:
        assert statuses(d["history"]) == [
            ("proposed", "detector:autodecay"),
            ("approved", "auto"),
            ("delivered", "worker"),
            ("applied", "local"),
        ]
        evidence = d["evidence"]
        assert evidence["metric"] == "epoch/train_loss" and evidence["detector"] == "autodecay"
        assert evidence["value"] < evidence["threshold"]
        assert evidence["window"][0] < evidence["window"][1] == d["step"]
        assert "stage" in evidence["explanation"]
        # Applied at the first step boundary after the epoch whose point completed the evidence.
        assert d["applied_step"] == d["step"] + 1
    assert [d["applied_lr"] for d in made] == pytest.approx([0.01, 0.001, 0.001])
    assert worker.lr == pytest.approx(0.001)
    assert [c.action for c in worker.applied] == ["decay", "decay", "stop"]

    stages = client.get(f"/api/v1/runs/{run.id}/stages").json()
    assert [(s["index"], s["lr"], s["source"]) for s in stages] == [
        (0, pytest.approx(0.1), "start"),
        (1, pytest.approx(0.01), "lr_change"),
        (2, pytest.approx(0.001), "lr_change"),
    ]
    assert stages[0]["start_step"] == 1
    # The LR logged at a step is the one its update used: the first update at the new LR follows the boundary.
    assert stages[0]["end_step"] == made[0]["applied_step"]
    assert stages[1]["start_step"] == made[0]["applied_step"] + 1
    assert stages[2]["end_step"] is None
    for stage in stages[:2]:
        summary = stage["summary"]
        assert summary["metric"] == "epoch/train_loss" and summary["count"] >= PARAMS["min_stage"]
        assert summary["min"] <= summary["last"] < summary["first"]
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "finished"


def test_observe_mode_only_records(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with start(server, tmp_path, "observe") as run:
        worker = CurveWorker(server, run)
        for _ in range(30):
            assert worker.train_epoch()
    made = decisions(server, run.id)
    assert len(made) >= 2
    assert {d["status"] for d in made} == {"observed"}
    assert all(d["action"] == "decay" for d in made), "an observed decay does not count towards max_decays"
    assert worker.applied == []
    assert set(lrs(client, run.id)) == {LR}
    assert client.get(f"/api/v1/runs/{run.id}/commands").json()["data"] == []
    assert len(client.get(f"/api/v1/runs/{run.id}/stages").json()) == 1


def test_approve_mode_waits_for_a_person_then_approve_and_override(
    server: LiveServer, client: httpx.Client, tmp_path: Path
):
    with start(server, tmp_path, "approve") as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: any(d["status"] == "proposed" for d in decisions(server, run.id)))
        (proposal,) = decisions(server, run.id)
        assert statuses(proposal["history"]) == [("proposed", "detector:autodecay")]
        for _ in range(3):  # nobody decided: the job goes on at the same LR
            assert worker.train_epoch()
        assert worker.lr == LR and worker.applied == []
        assert client.get(f"/api/v1/runs/{run.id}").json()["pending_proposals"] == 1

        approved = client.post(f"/api/v1/runs/{run.id}/decisions/{proposal['id']}/approve", json={"reason": "ok"})
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        worker.settle()
        assert worker.train_epoch()
        assert worker.lr == pytest.approx(LR * 0.1)
        again = client.post(f"/api/v1/runs/{run.id}/decisions/{proposal['id']}/approve", json={})
        assert again.status_code == 409 and "applied" in again.json()["detail"]

        worker.train_until(lambda: any(d["status"] == "proposed" for d in decisions(server, run.id)))
        second = decisions(server, run.id)[-1]
        overridden = client.post(f"/api/v1/runs/{run.id}/decisions/{second['id']}/override", json={"lr": 0.004})
        assert overridden.status_code == 200, overridden.text
        worker.settle()
        assert worker.train_epoch()
        assert worker.lr == pytest.approx(0.004)

    first, second = decisions(server, run.id)[:2]
    assert statuses(first["history"]) == [
        ("proposed", "detector:autodecay"),
        ("approved", "local"),
        ("delivered", "worker"),
        ("applied", "local"),
    ]
    assert first["history"][1]["note"] == "ok"
    assert (second["action"], second["lr"], second["factor"], second["overridden"]) == ("set_lr", 0.004, None, True)
    assert second["history"][1]["overrides"] == {"action": "decay", "factor": 0.1, "lr": None}
    assert second["applied_lr"] == pytest.approx(0.004) and second["status"] == "applied"
    assert [s["lr"] for s in client.get(f"/api/v1/runs/{run.id}/stages").json()] == pytest.approx([0.1, 0.01, 0.004])


def test_reject_backs_off_and_does_not_count(server: LiveServer, client: httpx.Client, tmp_path: Path):
    params = {**PARAMS, "max_decays": 1}
    detector = {**DETECTOR, "params": params}
    with start(server, tmp_path, "approve", detector=detector) as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: bool(decisions(server, run.id)))
        (proposal,) = decisions(server, run.id)
        rejected_at = worker.epoch
        body = {"reason": "too early", "backoff": {"epochs": 10}}
        response = client.post(f"/api/v1/runs/{run.id}/decisions/{proposal['id']}/reject", json=body)
        assert response.status_code == 200, response.text
        worker.train_until(lambda: len(decisions(server, run.id)) == 2)
    rejected, following = decisions(server, run.id)
    assert statuses(rejected["history"]) == [("proposed", "detector:autodecay"), ("rejected", "local")]
    # Held for 10 epochs (points of epochs < rejected_at + 10 are not fed), then a whole new stage of evidence.
    first_fed = rejected_at + 10
    assert following["step"] >= (first_fed + PARAMS["min_stage"] - 1) * STEPS_PER_EPOCH
    # The rejected decay did not count: with max_decays=1 the next decision is still a decay, not a stop.
    assert following["action"] == "decay"
    assert worker.applied == [] and worker.lr == LR
    assert following["status"] == "expired"  # the run ended while it waited
    kinds = [e["kind"] for e in client.get(f"/api/v1/runs/{run.id}/events").json()["data"]]
    assert "decision.rejected" in kinds and "decision.expired" in kinds


def test_auto_approval_after_a_timeout(server: LiveServer, tmp_path: Path):
    with start(server, tmp_path, "approve", auto_approve_after_s=0.3) as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: bool(decisions(server, run.id)))
        deadline = time.monotonic() + 10
        while decisions(server, run.id)[0]["status"] == "proposed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker.settle()
        assert worker.train_epoch()
        assert worker.lr == pytest.approx(0.01)
    (decision, *_) = decisions(server, run.id)
    assert statuses(decision["history"])[:2] == [("proposed", "detector:autodecay"), ("approved", "auto-approve")]
    assert decision["status"] == "applied"


def progress(server: LiveServer, run_id: int | None) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/v1/runs/{run_id}/detection", params={"wait": 10})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["caught_up"], body
    return body


def test_a_waiting_proposal_says_when_it_will_be_auto_approved_and_acting_first_wins(
    server: LiveServer, client: httpx.Client, tmp_path: Path
):
    with start(server, tmp_path, "approve", auto_approve_after_s=3600) as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: bool(decisions(server, run.id)))
        (proposal,) = decisions(server, run.id)
        created = dt.datetime.fromisoformat(proposal["created_at"])
        due = dt.datetime.fromisoformat(proposal["auto_approve_at"])
        assert (due - created).total_seconds() == pytest.approx(3600)
        approved = client.post(f"/api/v1/runs/{run.id}/decisions/{proposal['id']}/approve", json={})
        assert approved.status_code == 200 and approved.json()["auto_approve_at"] is None
    (decision,) = decisions(server, run.id)[:1]
    assert statuses(decision["history"])[1] == ("approved", "local")


def test_an_auto_approval_delay_past_the_calendar_means_never() -> None:
    """Not an OverflowError that would stop the sweep of every run."""
    now = dt.datetime.now(dt.UTC)
    decision = Decision(status="proposed", created_at=now)
    assert auto_approve_at(decision, Run(mode="approve", auto_approve_after_s=1e12)) is None
    assert auto_approve_at(decision, Run(mode="approve", auto_approve_after_s=60.0)) == now + dt.timedelta(seconds=60)
    assert auto_approve_at(decision, Run(mode="auto", auto_approve_after_s=60.0)) is None


def test_a_proposal_left_waiting_is_never_superseded_by_its_own_shadow(
    server: LiveServer, client: httpx.Client, tmp_path: Path
):
    """The demo's bug: while a decay waited, the detector was fed as if it had happened, decided a stop on
    that false premise and superseded the decay. Now nothing is fed while a proposal waits, however long."""
    with start(server, tmp_path, "approve") as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: bool(decisions(server, run.id)))
        (proposal,) = decisions(server, run.id)
        assert proposal["action"] == "decay"
        for _ in range(40):  # nobody decides for 40 epochs: five times what a stage takes here
            assert worker.train_epoch()
        state = progress(server, run.id)
        (still,) = decisions(server, run.id)
        assert (still["id"], still["status"]) == (proposal["id"], "proposed")
        assert state["waiting_on"] == proposal["id"]
        assert state["fed_through_step"] == proposal["step"]  # the detector has consumed nothing since
        assert state["through_step"] == worker.step  # yet every point has been examined (stages, summaries)

        approved = client.post(f"/api/v1/runs/{run.id}/decisions/{proposal['id']}/approve", json={})
        assert approved.status_code == 200, approved.text
        worker.settle()
        assert worker.train_epoch()  # applied at its first step
        assert run.flush(timeout=10)
        applied_at = decisions(server, run.id)[0]["applied_step"]
        assert applied_at is not None and applied_at > proposal["step"] + 40 * STEPS_PER_EPOCH - STEPS_PER_EPOCH
        # The next stage is judged on points after the decay was applied, and it is a decay again, not a stop:
        # the waiting proposal counted once, when it was applied.
        worker.train_until(lambda: len(decisions(server, run.id)) == 2)
        second = decisions(server, run.id)[1]
    assert second["action"] == "decay"
    assert second["evidence"]["window"][0] > applied_at
    # The stage it judged is the one the API shows, opened by the applied decay.
    assert second["evidence"]["stage"]["start_step"] == applied_at + 1
    assert second["evidence"]["stage"]["lr"] == pytest.approx(LR * 0.1)
    assert worker.lr == pytest.approx(LR * 0.1)


def test_an_operator_command_supersedes_a_waiting_proposal(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with start(server, tmp_path, "approve") as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: bool(decisions(server, run.id)))
        (old,) = decisions(server, run.id)
        now = client.post(f"/api/v1/runs/{run.id}/commands", json={"action": "decay", "factor": 0.5})
        assert now.status_code == 201
        worker.settle()
        assert worker.train_epoch()
        assert worker.lr == pytest.approx(0.05)
        stale = client.post(f"/api/v1/runs/{run.id}/decisions/{old['id']}/approve", json={})
        assert stale.status_code == 409 and "superseded" in stale.json()["detail"]
        assert progress(server, run.id)["waiting_on"] is None  # the detector was told; it feeds again
        # A new stage at 0.05; the superseded decay did not count (max_decays 2): the next one is a decay.
        worker.train_until(lambda: len(decisions(server, run.id)) == 3)
    made = decisions(server, run.id)
    assert [d["status"] for d in made[:2]] == ["superseded", "applied"]
    assert made[0]["history"][-1]["note"] == f"superseded by decision {made[1]['id']}"
    assert made[1]["source"] == "operator" and made[1]["applied_lr"] == pytest.approx(0.05)
    assert (made[2]["action"], made[2]["source"]) == ("decay", "detector:autodecay")
    assert worker.applied[0].action == "decay"


def test_hold_then_stop(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with start(server, tmp_path, "auto") as run:
        worker = CurveWorker(server, run)
        assert worker.train_epoch()
        held = client.post(f"/api/v1/runs/{run.id}/hold", json={"epochs": 15, "reason": "warm-up"})
        assert held.status_code == 200, held.text
        assert held.json()["hold_until_epoch"] == 16.0
        for _ in range(15):
            assert worker.train_epoch()
        assert decisions(server, run.id) == [], "the held detector decided"
        assert client.post(f"/api/v1/runs/{run.id}/commands", json={"action": "stop"}).status_code == 201
        worker.settle()
        assert not worker.train_epoch()
    assert worker.applied[-1].action == "stop"
    kinds = [e["kind"] for e in client.get(f"/api/v1/runs/{run.id}/events").json()["data"]]
    assert "detector.held" in kinds


# --- restarts -------------------------------------------------------------------------------------------------


def _train_with_restart(settings: Settings, tmp_path: Path, restart_after: int | None, name: str) -> list[Any]:
    """A 30-epoch auto-mode run; with ``restart_after`` the server is replaced by a new one on the same
    database after that many epochs (the worker pauses meanwhile)."""
    live = LiveServer(create_app(settings)).__enter__()
    try:
        run = trainer.start_run(live.url, name=name, spool_dir=tmp_path / name, detector=DETECTOR, mode="auto")
        with run:
            worker = CurveWorker(live, run)
            for epoch in range(30):
                if epoch == restart_after:
                    assert run.flush(timeout=10)
                    live.__exit__()
                    live = LiveServer(create_app(settings), port=live.port).__enter__()
                    worker.server = live
                if not worker.train_epoch():
                    break
        return [
            (d["action"], d["step"], d["applied_step"], d["evidence"]["value"], d["evidence"]["threshold"])
            for d in decisions(live, run.id)
        ]
    finally:
        live.__exit__()


def test_restart_mid_run_makes_the_same_decisions(settings: Settings, tmp_path: Path):
    reference = _train_with_restart(settings, tmp_path, None, "reference")
    assert [d[0] for d in reference] == ["decay", "decay", "stop"]
    for restart_after in (5, 11):  # in the middle of the first stage; just after the first decay
        assert _train_with_restart(settings, tmp_path, restart_after, f"restart-{restart_after}") == reference


def test_a_pending_proposal_survives_a_restart(settings: Settings, tmp_path: Path):
    live = LiveServer(create_app(settings)).__enter__()
    try:
        with trainer.start_run(
            live.url, spool_dir=tmp_path / "spool", detector=DETECTOR, mode="approve", retry_max_s=0.5
        ) as run:
            worker = CurveWorker(live, run)
            worker.train_until(lambda: bool(decisions(live, run.id)))
            assert run.flush(timeout=10)
            live.__exit__()
            live = LiveServer(create_app(settings), port=live.port).__enter__()
            worker.server = live
            (proposal,) = decisions(live, run.id)
            assert proposal["status"] == "proposed"
            response = httpx.post(f"{live.url}/api/v1/runs/{run.id}/decisions/{proposal['id']}/approve", json={})
            assert response.status_code == 200, response.text
            worker.settle()
            assert worker.train_epoch()
            assert worker.lr == pytest.approx(0.01)
        assert decisions(live, run.id)[0]["status"] == "applied"
    finally:
        live.__exit__()


# --- configuration and bad input ------------------------------------------------------------------------------


def test_detector_configuration_is_validated(client: httpx.Client):
    unknown = client.post("/api/v1/runs", json={"detector": {"name": "oracle"}})
    assert unknown.status_code == 422 and "unknown detector 'oracle'" in unknown.json()["detail"]
    bad = client.post("/api/v1/runs", json={"detector": {"name": "autodecay", "params": {"rho": 3}}})
    assert bad.status_code == 422 and "rho" in bad.json()["detail"]
    mode = client.post("/api/v1/runs", json={"mode": "yolo"})
    assert mode.status_code == 422 and "mode" in mode.json()["detail"]
    backoff = client.post("/api/v1/runs", json={"reject_backoff": {"epochs": 1, "steps": 5}})
    assert backoff.status_code == 422 and "exactly one of epochs and steps" in backoff.json()["detail"]
    assert client.get("/api/v1/runs").json()["data"] == [], "a refused run was stored"

    run = client.post("/api/v1/runs", json={"detector": DETECTOR, "mode": "approve"}).json()
    assert (run["mode"], run["detector"]["params"], run["pending_proposals"]) == ("approve", PARAMS, 0)
    changed = client.patch(f"/api/v1/runs/{run['id']}", json={"mode": "auto", "detector": None})
    assert changed.status_code == 200 and (changed.json()["mode"], changed.json()["detector"]) == ("auto", None)
    override = client.post(f"/api/v1/runs/{run['id']}/decisions/1/override", json={"factor": 0.5, "lr": 0.1})
    assert override.status_code == 422 and "exactly one of factor and lr" in override.json()["detail"]
    missing = client.post(f"/api/v1/runs/{run['id']}/decisions/999/approve", json={})
    assert missing.status_code == 404 and "no decision 999" in missing.json()["detail"]
    hold = client.post(f"/api/v1/runs/{run['id']}/hold", json={"epochs": 2})
    assert hold.status_code == 422 and "carry no epoch" in hold.json()["detail"]


def test_changing_the_detector_mid_run_rebuilds_it_silently(server: LiveServer, client: httpx.Client, tmp_path):
    with start(server, tmp_path, "auto", detector={**DETECTOR, "params": {**PARAMS, "min_stage": 50}}) as run:
        worker = CurveWorker(server, run)
        for _ in range(12):
            assert worker.train_epoch()
        assert decisions(server, run.id) == []
        # The new configuration would have decided at epoch ~8: it does not act on the past.
        response = client.patch(f"/api/v1/runs/{run.id}", json={"detector": DETECTOR})
        assert response.status_code == 200, response.text
        worker.settle()
        assert decisions(server, run.id) == []
        worker.train_until(lambda: bool(decisions(server, run.id)))
    (decision, *_) = decisions(server, run.id)
    assert decision["step"] > 12 * STEPS_PER_EPOCH


def test_only_operators_change_detection(secured: tuple[str, dict[str, str]]):
    base, tokens = secured
    worker = {"Authorization": f"Bearer {tokens['worker']}"}
    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    run = httpx.post(f"{base}/api/v1/runs", json={"detector": DETECTOR, "mode": "approve"}, headers=worker)
    assert run.status_code == 201, run.text
    url = f"{base}/api/v1/runs/{run.json()['id']}"
    refused = httpx.patch(url, json={"mode": "auto"}, headers=worker)
    assert refused.status_code == 403 and "changing mode needs the operator role" in refused.json()["detail"]
    assert httpx.patch(url, json={"status": "finished"}, headers=worker).status_code == 200
    assert httpx.patch(url, json={"mode": "auto"}, headers=operator).json()["mode"] == "auto"
    assert httpx.post(f"{url}/hold", json={"steps": 5}, headers=worker).status_code == 403


def test_stages_without_an_lr_until_one_is_logged(server: LiveServer, client: httpx.Client):
    run_id = client.post("/api/v1/runs", json={"detector": DETECTOR, "mode": "observe"}).json()["id"]
    live = server.app.state.stagewatch.live

    def post(key: str, steps: range, value: float) -> None:
        body = {"points": [{"key": key, "step": s, "value": value, "epoch": float(s)} for s in steps]}
        assert client.post(f"/api/v1/runs/{run_id}/metrics", json=body).status_code == 200
        assert live.wait_idle(timeout=10)

    post("epoch/train_loss", range(1, 4), 0.5)
    (stage,) = client.get(f"/api/v1/runs/{run_id}/stages").json()
    assert (stage["start_step"], stage["lr"], stage["summary"]["count"]) == (1, None, 3)
    assert client.get(f"/api/v1/runs/{run_id}").json()["stage"] == {"index": 0, "start_step": 1, "lr": None}
    post("lr", range(1, 5), 0.1)  # the LR becomes known: the open stage takes it, no new stage
    post("lr", range(5, 7), 0.05)
    post("epoch/train_loss", range(4, 7), 0.4)
    stages = client.get(f"/api/v1/runs/{run_id}/stages").json()
    assert [(s["index"], s["start_step"], s["end_step"], s["lr"]) for s in stages] == [
        (0, 1, 4, 0.1),
        (1, 5, None, 0.05),
    ]
    assert [s["summary"]["count"] for s in stages] == [4, 2]
    assert client.get(f"/api/v1/runs/{run_id}").json()["stage"] == {"index": 1, "start_step": 5, "lr": 0.05}
    listed = client.get("/api/v1/runs").json()["data"]
    assert [r["stage"] for r in listed if r["id"] == run_id] == [{"index": 1, "start_step": 5, "lr": 0.05}]
