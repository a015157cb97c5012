"""``stagewatch train`` as a real subprocess against a live server, and ``stagewatch demo`` with its worker."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, free_port, sqlite_copy
from tests.test_cli import STAGEWATCH, cli_env, running, stagewatch
from trainer.train_cli import DEFAULT_LR, build_parser, default_run_name

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

REPO = Path(__file__).resolve().parent.parent
TRAIN_TIMEOUT_S = 50
DEMO_TIMEOUT_S = 40
EPOCH_KEYS = ("epoch/train_loss", "test/loss", "test/accuracy")


@pytest.fixture
def migrated_url(tmp_path: Path, migrated_templates: dict[str, str]) -> str:
    """SQLite only: what is tested here is the worker side, the same on either engine."""
    return sqlite_copy(migrated_templates, tmp_path)


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return stagewatch(tmp_path, "train", *args, timeout=TRAIN_TIMEOUT_S)


def run_id_of(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    match = re.search(r"^stagewatch train: run (\d+) \(", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return int(match.group(1))


def series(client: httpx.Client, run_id: int, key: str) -> list[dict[str, float]]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl", "key": key})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_train_streams_steps_and_epochs(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--epochs", "2", "--num-samples", "600", "--batch-size", "50",
        "--server", server.url, "--name", "cli-test",
    )  # fmt: skip
    run_id = run_id_of(result)
    assert re.search(rf"run {run_id} finished: 2 epochs, 20 steps", result.stdout), result.stdout

    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "finished", run
    assert run["name"] == "cli-test"
    assert run["config"]["batch_size"] == 50

    # 600 samples, 80% for training: 480 / 50 -> 10 updates per epoch.
    losses = series(client, run_id, "train/loss")
    assert [p["step"] for p in losses] == list(range(1, 21))
    assert all(math.isfinite(p["value"]) and p["value"] > 0 for p in losses)
    lrs = series(client, run_id, "lr")
    assert [p["value"] for p in lrs] == [DEFAULT_LR] * 20
    assert lrs[-1]["epoch"] == pytest.approx(2.0)
    for key in EPOCH_KEYS:
        epoch_points = series(client, run_id, key)
        assert [(p["step"], p["epoch"]) for p in epoch_points] == [(10, 1.0), (20, 2.0)], key
        assert all(math.isfinite(p["value"]) for p in epoch_points), key
    accuracy = [p["value"] for p in series(client, run_id, "test/accuracy")]
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    # It learns: the second epoch's training loss is below ln(10), the loss of a uniform guess.
    assert series(client, run_id, "epoch/train_loss")[-1]["value"] < math.log(10)


def test_train_full_batch_with_step_schedule(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--epochs", "4", "--num-samples", "200", "--batch-size", "0",
        "--schedule", "step", "--lr", "0.05", "--server", server.url,
    )  # fmt: skip
    run_id = run_id_of(result)
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"
    # Full batch: one update per epoch; x0.1 at epoch 2 (50%) and epoch 3 (75%).
    lrs = [(p["step"], p["value"]) for p in series(client, run_id, "lr")]
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    assert [v for _, v in lrs] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert len(series(client, run_id, "test/accuracy")) == 4


def test_train_one_full_batch_epoch(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--epochs", "1", "--num-samples", "600", "--batch-size", "0",
        "--server", server.url,
    )  # fmt: skip
    run_id = run_id_of(result)
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "finished"
    # No --name: what ran and when, so that a rerun of the same command gets a name of its own.
    assert re.fullmatch(r"mnist1d-cnn \w+ lr=\S+ seed=\d+ \d\d-\d\d \d\d:\d\d:\d\d", run["name"]), run["name"]
    assert [p["step"] for p in series(client, run_id, "train/loss")] == [1]
    assert [p["step"] for p in series(client, run_id, "test/loss")] == [1]


def test_train_unknown_recipe_exits_2(tmp_path: Path) -> None:
    result = train(tmp_path, "--recipe", "resnet-9000", "--server", "http://127.0.0.1:9")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown recipe 'resnet-9000'" in result.stderr
    assert "mnist1d-cnn" in result.stderr
    assert result.stdout == ""


def test_train_stops_on_stop_command(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    stdout = tmp_path / "train.out"
    with stdout.open("w") as out:
        popen = subprocess.Popen(
            [str(STAGEWATCH), "train", "--recipe", "mnist1d-cnn", "--epochs", "200", "--server", server.url],
            env=cli_env(tmp_path), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + TRAIN_TIMEOUT_S
            run_id = None
            while run_id is None:
                assert time.monotonic() < deadline, stdout.read_text()
                assert popen.poll() is None, stdout.read_text()
                match = re.search(r"^stagewatch train: run (\d+) \(", stdout.read_text(), re.MULTILINE)
                run_id = int(match.group(1)) if match else None
                time.sleep(0.1)
            sent = client.post(f"/api/v1/runs/{run_id}/commands", json={"action": "stop", "reason": "test"})
            assert sent.status_code in (200, 201), sent.text
            assert popen.wait(timeout=TRAIN_TIMEOUT_S) == 0, stdout.read_text()
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait(timeout=10)
    text = stdout.read_text()
    assert f"run {run_id} stopped by the server at step" in text, text
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"
    steps = [p["step"] for p in series(client, run_id, "train/loss")]
    assert 0 < len(steps) < 200 * 125, "training did not stop early"


def test_demo_starts_a_worker_and_stops_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(home, "demo", "--port", str(port)) as demo:
        demo.wait_healthy(base)
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while True:
            runs = httpx.get(f"{base}/api/v1/runs", timeout=10).json()["data"]
            if runs:
                points = httpx.get(
                    f"{base}/api/v1/runs/{runs[0]['id']}/metrics", params={"key": "train/loss"}, timeout=10
                )
                if points.status_code == 200 and points.json()["series"]:
                    break
            assert time.monotonic() < deadline, f"no train/loss from the demo's worker\n{demo.output()}"
            assert demo.popen.poll() is None, demo.output()
            time.sleep(0.25)
        match = re.search(r"Worker \(pid (\d+)\) is training run (\d+)", demo.stdout_path.read_text())
        assert match, demo.output()
        worker_pid, run_id = int(match.group(1)), int(match.group(2))
        assert run_id == runs[0]["id"]
        os.kill(worker_pid, 0)  # alive while the demo runs
    assert demo.popen.poll() is not None
    # The demo stops (and reaps) its worker before it exits, so the pid is gone at once. The grace is short on
    # purpose: an orphaned worker would also die, but later (of a broken stdout pipe at its next line).
    deadline = time.monotonic() + 0.2
    while True:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"the demo's worker (pid {worker_pid}) outlived the demo"
        time.sleep(0.1)


def test_train_help_needs_no_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--help"],
        env=cli_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout


# Small stages: AutoDecay judges a stage over 5 epoch points (the defaults need tens of epochs).
QUICK_DETECTOR = ("min_stage=5", "confirm=1", "min_window_blocks=3", "max_decays=1")


def caught_up(client: httpx.Client, run_id: int) -> bool:
    progress = client.get(f"/api/v1/runs/{run_id}/detection", params={"wait": 30}).json()
    caught: bool = progress["caught_up"]
    return caught


def detector_args(*params: str) -> list[str]:
    return [arg for param in params for arg in ("--detector-param", param)]


def test_train_autodecay_auto_mode_applies_the_servers_decay(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--schedule", "autodecay", "--epochs", "12", "--num-samples", "1000",
        "--batch-size", "25", *detector_args(*QUICK_DETECTOR), "--server", server.url, "--sync-detection",
        "--checkpoint-dir", str(tmp_path / "ckpts"),
    )  # fmt: skip
    run_id = run_id_of(result)
    assert caught_up(client, run_id)
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["mode"], run["detector"]["name"], run["config"]["schedule"]) == ("auto", "autodecay", "autodecay")
    params = {"preset": "epoch", "mode": "max", "chance": 0.1, "min_stage": 5, "confirm": 1, "min_window_blocks": 3}
    assert (run["detector"]["metric"], run["detector"]["params"]) == ("test/accuracy", {**params, "max_decays": 1})
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert decisions, "the detector never decided"
    first = decisions[0]
    assert (first["action"], first["status"], first["source"]) == ("decay", "applied", "detector:autodecay")
    # The worker applied it at a step boundary after the epoch point that completed the evidence, and every
    # update from the next one on used the new LR.
    assert first["applied_step"] > first["step"]
    lrs = {p["step"]: p["value"] for p in series(client, run_id, "lr")}
    assert lrs[first["applied_step"]] == pytest.approx(DEFAULT_LR)
    assert lrs[first["applied_step"] + 1] == pytest.approx(DEFAULT_LR * 0.1) == first["applied_lr"]
    stages = client.get(f"/api/v1/runs/{run_id}/stages").json()
    assert [(s["lr"], s["start_step"]) for s in stages[:2]] == [
        (pytest.approx(DEFAULT_LR), 1),
        (pytest.approx(DEFAULT_LR * 0.1), first["applied_step"] + 1),
    ]
    # --checkpoint-dir: the stage checkpoint saved just before the decay, listed with the stage it ends.
    (checkpoint,) = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["data"]
    path = tmp_path / "ckpts" / f"stage-end-step{first['applied_step']}.pt"
    assert (checkpoint["step"], checkpoint["uri"], checkpoint["decision_id"], checkpoint["stage"]) == (
        first["applied_step"],
        str(path.resolve()),
        first["id"],
        0,
    )
    assert path.is_file() and checkpoint["lr"] == pytest.approx(DEFAULT_LR)
    assert "test/accuracy" in checkpoint["metrics"]


def test_train_plateau_and_observe_mode(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--schedule", "plateau", "--epochs", "12", "--num-samples", "1000",
        "--batch-size", "25", *detector_args(*QUICK_DETECTOR), "--server", server.url,
    )  # fmt: skip
    run_id = run_id_of(result)
    assert caught_up(client, run_id)  # detection runs after ingest: read its decisions once it has caught up
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["mode"], run["config"]["schedule"]) == ("observe", "plateau")
    # In observe mode the detector's decisions are only recorded: the LR is the plateau schedule's alone,
    # which cannot decay within 12 epochs (patience 10 after the best epoch).
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert decisions and {d["status"] for d in decisions} == {"observed"}
    assert {p["value"] for p in series(client, run_id, "lr")} == {DEFAULT_LR}


def test_train_refused_detector_parameter_exits_2(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(tmp_path, "--recipe", "mnist1d-cnn", "--detector-param", "rho=7", "--server", server.url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rho" in result.stderr and "Traceback" not in result.stderr
    assert client.get("/api/v1/runs").json()["data"] == []


def test_train_width_and_label_noise(server: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    result = train(
        tmp_path, "--recipe", "mnist1d-cnn", "--epochs", "1", "--num-samples", "200", "--width", "8",
        "--label-noise", "0.25", "--server", server.url,
    )  # fmt: skip
    config = client.get(f"/api/v1/runs/{run_id_of(result)}").json()["config"]
    assert (config["channels"], config["label_noise"]) == (8, 0.25)


def test_label_noise_changes_only_training_labels() -> None:
    from trainer.recipes.mnist1d import NUM_CLASSES, load_data, with_label_noise

    data = load_data(num_samples=1000)
    noisy = with_label_noise(data, 0.5, seed=3)
    changed = (noisy.y_train != data.y_train).float().mean().item()
    # Half the labels are redrawn uniformly; a redrawn label keeps its class with probability 1/10.
    assert changed == pytest.approx(0.5 * (1 - 1 / NUM_CLASSES), abs=0.05)
    assert noisy.y_test is data.y_test and noisy.x_train is data.x_train
    assert bool((with_label_noise(data, 0.5, seed=3).y_train == noisy.y_train).all()), "not deterministic"
    assert with_label_noise(data, 0.0, seed=3) is data
    with pytest.raises(ValueError, match="label noise must be in"):
        with_label_noise(data, 1.5, seed=3)


def test_reruns_of_one_command_get_different_default_names() -> None:
    args = build_parser().parse_args(["--recipe", "mnist1d-cnn", "--lr", "0.05", "--seed", "3"])
    first = default_run_name(args, dt.datetime(2026, 12, 4, 22, 15, 3))
    again = default_run_name(args, dt.datetime(2026, 12, 4, 22, 15, 4))
    assert first.startswith("mnist1d-cnn ") and "lr=0.05 seed=3 12-04 22:15:03" in first
    assert first != again
