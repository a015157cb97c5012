"""The demo's story, end to end, on the demo's own settings (``server.cli.demo_worker_command``).

A real ``stagewatch train`` worker (MNIST-1D, AutoDecay in approve mode) against the real server, nobody
clicking: stages appear; AutoDecay proposes a decay with its evidence; nobody decides, so it is auto-approved
(visibly: actor ``auto-approve``); the worker applies it; a new stage opens at the new LR; later the last stage
ends and training stops. Only the auto-approval delay is shorter than the demo's minute. Nothing here depends
on the machine's speed: the worker goes on training while a proposal waits, and the detector waits for it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cli import demo_worker_command
from tests.conftest import LiveServer
from trainer.train_cli import DEFAULT_LR

pytestmark = pytest.mark.slow


def test_the_demo_tells_the_whole_story(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    command = demo_worker_command(server.url, auto_approve_after_s=1)
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = client.get("/api/v1/runs").json()["data"]
    (run,) = runs
    progress = client.get(f"/api/v1/runs/{run['id']}/detection", params={"wait": 30}).json()
    assert progress["caught_up"], progress
    decisions: list[dict[str, Any]] = client.get(f"/api/v1/runs/{run['id']}/decisions").json()
    stages: list[dict[str, Any]] = client.get(f"/api/v1/runs/{run['id']}/stages").json()
    story = [(d["action"], d["status"]) for d in decisions]

    # A decay was proposed with its evidence, nobody decided, auto-approval approved it, the worker applied it.
    decay = decisions[0]
    assert decay["action"] == "decay", story
    assert decay["evidence"]["explanation"] and decay["evidence"]["window"][1] == decay["step"]
    walk = [(h["status"], h["actor"]) for h in decay["history"]]
    assert walk[:2] == [("proposed", "detector:autodecay"), ("approved", "auto-approve")], walk
    assert decay["status"] == "applied" and decay["applied_lr"] == pytest.approx(DEFAULT_LR * 0.1)
    # Never superseded by a decision derived from it: every decision was applied.
    assert {d["status"] for d in decisions} == {"applied"}, story
    # A new stage opened at the new LR right after the step the worker applied the decay at.
    assert stages[0]["lr"] == pytest.approx(DEFAULT_LR)
    assert (stages[1]["lr"], stages[1]["start_step"]) == (pytest.approx(DEFAULT_LR * 0.1), decay["applied_step"] + 1)
    # Every decision names the stage it judged as the API shows it: the decay the first, the next one the stage
    # at the new LR.
    shown = {(s["index"], s["start_step"]) for s in stages}
    assert all((d["evidence"]["stage"]["index"], d["evidence"]["stage"]["start_step"]) in shown for d in decisions)
    assert decay["evidence"]["stage"]["index"] == 0
    assert decisions[1]["evidence"]["stage"]["start_step"] == decay["applied_step"] + 1
    # Later the last stage ended: a stop, applied, and training stopped before its 100-epoch budget.
    assert decisions[-1]["action"] == "stop", story
    assert "stopped by the server" in done.stdout
    assert client.get(f"/api/v1/runs/{run['id']}").json()["status"] == "finished"
