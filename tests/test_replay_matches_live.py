"""``stagewatch replay`` of a live run's export makes the decisions the live server made, decision for decision.

A real worker (``trainer.start_run`` + ``CommandApplier``, see tests/test_live_detection.py) trains against the
real server with AutoDecay, in observe mode and in auto mode; the run is exported as the long CSV and replayed
by the command line with ``--assume observed`` / ``--assume logged``. Steps, actions and the whole evidence
(window, statistic, value, threshold, explanation, details) must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.test_live_detection import DETECTOR, PARAMS, CurveWorker, decisions, start

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

NOISY = {**PARAMS, "min_stage": 8, "confirm": 2, "max_decays": 2}


def replayed(server: LiveServer, run_id: int | None, tmp_path: Path, params: dict[str, Any], assume: str) -> list[Any]:
    export = httpx.get(f"{server.url}/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"}, timeout=30)
    assert export.status_code == 200, export.text
    path = tmp_path / "export.csv"
    path.write_text(export.text)
    sets = [arg for k, v in params.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "replay", "--detector", "autodecay", *sets,
         "--key", "epoch/train_loss", "--assume", assume, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def comparable(made: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    """What live and replay must agree on (live evidence also names the metric, the detector and the stage)."""
    out = []
    for d in made:
        evidence = {k: v for k, v in d["evidence"].items() if k not in ("metric", "detector", "stage")}
        out.append((d["step"], d["action"], evidence))
    return out


@pytest.mark.parametrize("mode, assume", [("observe", "observed"), ("auto", "logged")])
def test_replay_of_the_export_equals_the_live_decisions(
    server: LiveServer, tmp_path: Path, mode: str, assume: str
) -> None:
    detector = {**DETECTOR, "params": NOISY}
    with start(server, tmp_path, mode, detector=detector) as run:
        worker = CurveWorker(server, run)
        worker.train_until(lambda: len(decisions(server, run.id)) >= 3 or worker.applier.should_stop, max_epochs=80)
        progress = httpx.get(f"{server.url}/api/v1/runs/{run.id}/detection", params={"wait": 10}).json()
        assert progress["caught_up"], progress
    live = decisions(server, run.id)
    assert len(live) >= 2, live  # enough to compare: at least one decision after the first
    if mode == "auto":
        assert any(d["status"] == "applied" for d in live)
    again = replayed(server, run.id, tmp_path, NOISY, assume)
    assert comparable(again) == comparable(live), json.dumps([live[:2], again[:2]], indent=1)
