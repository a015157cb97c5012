"""``python -m benchmarks.paper --quick``: the reproduction report end to end on a tiny budget.

The real command in its own process: a real ``stagewatch serve``, real training through the real client, the
time-to-accuracy benchmark's real workers, and Chromium for the PNGs. Its numbers mean nothing at this size;
the test checks that every claim's numbers, verdict and figure reach the JSON, the HTML and the summary, and
that the pipeline itself held (no point lost, the server's stages at the scheduled decays).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # 11 small trainings, two servers, Chromium: 40-90 s on two cores

REPO = Path(__file__).resolve().parent.parent


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_quick_report_has_every_claim(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper", "--quick", "--png", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    doc = json.loads((tmp_path / "paper.json").read_text())
    assert doc["problems"] == []
    claims = doc["claims"]
    assert set(claims) == {"a", "b", "c", "d"}

    # (a) every SGD run's server stages begin exactly at the scheduled decays; jumps and sharpness per curve.
    sgd = [r for r in doc["runs"] if r["kind"] == "sgd"]
    assert sgd and all(r["server_boundaries_at_decays"] for r in sgd)
    assert all(len(r["server_stages"]) == 3 for r in sgd)
    for key in ("epoch/train_loss", "test/loss", "test/accuracy"):
        for decay in claims["a"]["summary"][key]:
            assert _finite(decay["jump"]["mean"]) and "sharpness" in decay
    assert isinstance(claims["a"]["verdict"]["holds"], bool)

    # (b) both full-batch protocols, measured against SGD at every curve and decay.
    assert set(claims["b"]["summary"]) == {"gd", "gd-long"}
    for kind in ("gd", "gd-long"):
        assert [r["batch_size"] for r in doc["runs"] if r["kind"] == kind] == [0]
        for per in claims["b"]["verdict"]["comparisons"][kind].values():
            assert len(per) == 2 and all(c["outcome"] for c in per)

    # (c) the time-to-accuracy benchmark ran fresh, StepDecay and AutoDecay.
    assert claims["c"]["source"].startswith("fresh")
    assert {"step", "autodecay"} <= set(claims["c"]["summary"])
    assert _finite(claims["c"]["verdict"]["epoch_share"]) and _finite(claims["c"]["verdict"]["accuracy_gap_pp"])

    # (d) the initialisation and the three stage ends, every target and evaluation.
    stages = claims["d"]["per_stage"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    for stage in stages:
        for field in ("reversed/probe", "reversed/finetune", "harder/probe", "harder/finetune"):
            assert 0 <= stage[field]["mean"] <= 100
    assert claims["d"]["verdict"]["outcome"] in {"holds", "contradicted", "inconclusive"}

    page = (tmp_path / "paper.html").read_text()
    for marker in ("(a) stages under StepDecay", "(b) gone under full batch", "(c) AutoDecay saves time",
                   "(d) later stages transfer worse", "Plotly.newPlot"):  # fmt: skip
        assert marker in page
    assert "<script src=" not in page  # self-contained: plotly.js inlined, nothing fetched
    for fig in ("fig-a", "fig-b", "fig-c", "fig-d"):
        assert f"id='{fig}'" in page
        assert (tmp_path / f"{fig}.png").read_bytes().startswith(b"\x89PNG")
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| ({c})" in summary for c in "abcd")
    assert "| (a)" in done.stdout  # the summary table is printed too
