"""Contract test: the real training client against the real app over real HTTP, on both databases."""

from __future__ import annotations

import csv
import io
import json
import math
import types
from pathlib import Path

import httpx
import pytest

import trainer
from tests.conftest import LiveServer

N_STEPS = 6_667  # x 3 keys = 20,001 points


def loss_at(step: int) -> float:
    if step == 100:
        return math.nan
    if step == 200:
        return math.inf
    return 2.0 / (1 + step) + 0.125


def values_at(step: int) -> dict[str, float]:
    return {
        "loss": loss_at(step),
        "lr": 0.1 if step < 5000 else 0.01,
        "acc": -math.inf if step == 300 else step / N_STEPS,
    }


def export(client: httpx.Client, run_id: int) -> list[dict[str, str]]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"})
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.text)))


def test_logs_20000_points_with_non_finite_values_exactly(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with trainer.start_run(server.url, name="contract", tags=["t1"], config={"lr": 0.1}, spool_dir=tmp_path) as run:
        assert run.state is trainer.RunState.OPENED
        for step in range(N_STEPS):
            run.log(values_at(step), step=step, epoch=step / 1000)
        assert run.flush(timeout=30)
        run_id = run.id
        assert run_id is not None
    assert run.points_sent == 3 * N_STEPS

    body = client.get(f"/api/v1/runs/{run_id}").json()
    assert body["status"] == "finished"
    assert body["name"] == "contract" and body["tags"] == ["t1"] and body["config"] == {"lr": 0.1}
    assert {k: v["count"] for k, v in body["latest"].items()} == {"loss": N_STEPS, "lr": N_STEPS, "acc": N_STEPS}

    series = client.get(f"/api/v1/runs/{run_id}/metrics", params={"key": "loss", "max_points": 100_000}).json()
    (loss,) = series["series"]
    assert loss["total_points"] == N_STEPS and not loss["downsampled"]
    assert loss["steps"] == list(range(N_STEPS))
    assert loss["values"][100] == "NaN" and loss["values"][200] == "Infinity"
    assert loss["values"][5] == loss_at(5) and loss["epochs"][5] == 0.005

    rows = export(client, run_id)
    assert len(rows) == 3 * N_STEPS
    by_key_step = {(r["key"], int(r["step"])): r["value"] for r in rows}
    assert len(by_key_step) == 3 * N_STEPS
    assert by_key_step[("acc", 300)] == "-Infinity"
    assert float(by_key_step[("lr", 6000)]) == 0.01
    assert float(by_key_step[("acc", 6666)]) == 6666 / N_STEPS
    assert not (tmp_path / "pending.jsonl").exists() and not (tmp_path / "rejected.jsonl").exists()


def test_failed_status_when_the_body_raises(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with pytest.raises(ZeroDivisionError), trainer.start_run(server.url, spool_dir=tmp_path) as run:
        run.log({"loss": 1.0}, step=0)
        _ = 1 / 0
    assert run.state is trainer.RunState.CLOSED
    body = client.get(f"/api/v1/runs/{run.id}").json()
    assert body["status"] == "failed"
    assert body["latest"]["loss"]["count"] == 1  # what was logged before the crash is stored


def test_resume_by_run_id(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with trainer.start_run(server.url, name="first", spool_dir=tmp_path / "a") as run:
        run.log({"loss": 1.0}, step=0)
    assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "finished"
    with trainer.start_run(server.url, run_id=run.id, spool_dir=tmp_path / "b") as resumed:
        assert resumed.id == run.id
        assert client.get(f"/api/v1/runs/{run.id}").json()["status"] == "running"
        resumed.log({"loss": 0.5}, step=1)
    body = client.get(f"/api/v1/runs/{run.id}").json()
    assert body["status"] == "finished" and body["name"] == "first"
    assert body["latest"]["loss"] == {**body["latest"]["loss"], "step": 1, "value": 0.5, "count": 2}


def test_resuming_an_unknown_run_raises(server: LiveServer, tmp_path: Path):
    with pytest.raises(trainer.ServerError) as info, trainer.start_run(server.url, run_id=999_999, spool_dir=tmp_path):
        pass
    assert info.value.status_code == 404


def test_lifecycle_misuse_raises(server: LiveServer, tmp_path: Path):
    run = trainer.start_run(server.url, spool_dir=tmp_path)
    with pytest.raises(trainer.RunStateError, match="unopened"):
        run.log({"loss": 1.0}, step=0)
    with run:
        with pytest.raises(trainer.RunStateError, match="already open"):
            run.__enter__()
        run.log({"loss": 1.0}, step=0)
    with pytest.raises(trainer.RunStateError, match="closed"):
        run.log({"loss": 1.0}, step=1)
    with pytest.raises(trainer.RunStateError, match="cannot be reopened"), run:
        pass


def test_bad_values_raise_type_error_at_once(server: LiveServer, client: httpx.Client, tmp_path: Path):
    with trainer.start_run(server.url, spool_dir=tmp_path) as run:
        with pytest.raises(TypeError, match="'loss': expected a real number, got str"):
            run.log({"loss": "0.3"}, step=0)  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="got bool"):
            run.log({"ok": True}, step=0)
        with pytest.raises(TypeError, match="step must be an int"):
            run.log({"loss": 1.0}, step=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="step must be >= 0"):
            run.log({"loss": 1.0}, step=-1)
        with pytest.raises(ValueError, match=r"step must be <= 2\*\*53"):
            run.log({"loss": 1.0}, step=2**53 + 1)  # a double would round it
        run.log({"loss": 1}, step=0)
        run.log({"loss": 2.0}, step=2**53)
    latest = client.get(f"/api/v1/runs/{run.id}").json()["latest"]["loss"]
    assert (latest["count"], latest["step"]) == (2, 2**53)


def test_conflicting_batch_is_rejected_into_the_spool_not_retried(
    server: LiveServer, client: httpx.Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with trainer.start_run(server.url, spool_dir=tmp_path) as run:
        run.log({"loss": 1.0}, step=0)
        assert run.flush(timeout=10)
        run.log({"loss": 2.0}, step=0)  # a different value for a stored (key, step): 409
        assert run.flush(timeout=10)
    assert run.points_rejected == 1
    (line,) = (tmp_path / "rejected.jsonl").read_text().splitlines()
    record = json.loads(line)  # the batch as sent (the column-wise form), with the server's answer
    assert record["status_code"] == 409 and "tables[0].values[0][0]: key 'loss' step 0" in record["detail"]
    assert [(t["keys"], t["steps"], t["values"]) for t in record["batch"]["tables"]] == [(["loss"], [0], [[2.0]])]
    assert any("refused a batch" in r.getMessage() for r in caplog.records)
    assert client.get(f"/api/v1/runs/{run.id}").json()["latest"]["loss"]["value"] == 1.0


def test_token_is_sent_as_bearer(secured: tuple[str, dict[str, str]], tmp_path: Path):
    url, tokens = secured
    with pytest.raises(trainer.AuthError) as info, trainer.start_run(url, spool_dir=tmp_path / "none"):
        pass
    assert info.value.status_code == 401
    with (
        pytest.raises(trainer.AuthError, match="needs the worker role"),
        trainer.start_run(url, token=tokens["viewer"], spool_dir=tmp_path / "viewer"),
    ):
        pass
    with trainer.start_run(url, token=tokens["worker"], spool_dir=tmp_path / "worker") as run:
        run.log({"loss": 0.25}, step=7)
    headers = {"Authorization": f"Bearer {tokens['viewer']}"}
    body = httpx.get(f"{url}/api/v1/runs/{run.id}", headers=headers).json()
    assert body["status"] == "finished" and body["latest"]["loss"]["value"] == 0.25


def test_public_surface():
    # Everything public that is not a submodule is exported, and nothing else.
    assert trainer.__all__ == sorted(
        n for n, v in vars(trainer).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
    )
    assert issubclass(trainer.AuthError, trainer.ServerError)
    assert issubclass(trainer.RunStateError, trainer.TrackerError) and issubclass(trainer.RunStateError, RuntimeError)
