"""``stagewatch train --recipe resnet18`` as a real subprocess against a live server.

torchvision must match its torch release exactly, and the CPU torch of ``.venv`` has no torchvision beside it,
so these tests run the ``stagewatch`` of a second environment, ``.venv-vision``, which a session fixture
builds with ``make vision-venv`` (a few minutes and about 6 GB the first time; a no-op while its stamp is
newer than pyproject.toml). They are never skipped: a missing torchvision is installed, not excused.

Only the pipeline is checked (FakeData and a tiny ImageFolder, on the CPU): loading, augmentation, the
model, the loop and what reaches the server, not that ResNet-18 learns anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, sqlite_copy
from tests.test_cli import cli_env
from tests.test_train_cli import EPOCH_KEYS, run_id_of, series

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

REPO = Path(__file__).resolve().parent.parent
VISION_BIN = REPO / ".venv-vision" / "bin"
VENV_TIMEOUT_S = 900
TRAIN_TIMEOUT_S = 180  # a few seconds of work; the margin is for a loaded two-core machine

# A tiny ImageFolder: two classes of flat-coloured PNGs (with a little noise) in sizes that need resizing.
WRITE_IMAGES = """
import random, sys
from pathlib import Path
from PIL import Image


root = Path(sys.argv[1])
rng = random.Random(0)
for split, count in (("train", 4), ("val", 2)):
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGB", (40 + 4 * i, 36), colour)
            image.putdata([tuple(min(255, c + rng.randrange(30)) for c in colour) for _ in range(image.width * 36)])
            image.save(folder / f"{i}.png")
"""


@pytest.fixture
def migrated_url(tmp_path: Path, migrated_templates: dict[str, str]) -> str:
    """SQLite only: what is tested here is the worker side, the same on either engine."""
    return sqlite_copy(migrated_templates, tmp_path)


@pytest.fixture(scope="session")
def vision_stagewatch() -> Iterator[Path]:
    """``.venv-vision/bin/stagewatch``, after ``make vision-venv`` (under a lock: pip must not race itself)."""
    lock_path = Path(tempfile.gettempdir()) / f"stagewatch-vision-venv-{hashlib.sha1(bytes(REPO)).hexdigest()[:12]}"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run(
                ["make", "vision-venv"], cwd=REPO, capture_output=True, text=True, timeout=VENV_TIMEOUT_S, check=False
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert result.returncode == 0, f"make vision-venv failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    yield VISION_BIN / "stagewatch"


def train(executable: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(executable), "train", "--recipe", "resnet18", "--device", "cpu", *args],
        env=cli_env(home), cwd=home, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False,
    )  # fmt: skip


def check_series(client: httpx.Client, run_id: int, epochs: int, steps_per_epoch: int) -> None:
    steps = epochs * steps_per_epoch
    losses = series(client, run_id, "train/loss")
    assert [p["step"] for p in losses] == list(range(1, steps + 1))
    assert all(math.isfinite(p["value"]) and p["value"] > 0 for p in losses)
    assert [p["step"] for p in series(client, run_id, "lr")] == list(range(1, steps + 1))
    expected = [(steps_per_epoch * (e + 1), float(e + 1)) for e in range(epochs)]
    for key in EPOCH_KEYS:
        points = series(client, run_id, key)
        assert [(p["step"], p["epoch"]) for p in points] == expected, key
        assert all(math.isfinite(p["value"]) for p in points), key
    assert all(0.0 <= p["value"] <= 1.0 for p in series(client, run_id, "test/accuracy"))


def test_resnet18_on_fake_data(
    vision_stagewatch: Path, server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    result = train(
        vision_stagewatch, tmp_path, "--fake-data", "64", "--image-size", "32", "--batch-size", "16",
        "--epochs", "2", "--workers", "0", "--server", server.url,
    )  # fmt: skip
    run_id = run_id_of(result)
    # 64 FakeData images, 1/8 kept for testing: 56 to train on, 4 minibatches of 16 (the last one of 8).
    assert f"run {run_id} finished: 2 epochs, 8 steps" in result.stdout, result.stdout
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "finished", run
    config = run["config"]
    assert config["recipe"] == "resnet18"
    assert config["steps_per_epoch"] == 4
    description = {
        "model": "resnet18", "data": "FakeData(64)", "num_train": 56, "num_test": 8, "num_classes": 10,
        "image_size": 32, "stem": "cifar", "device": "cpu", "workers": 0,
    }  # fmt: skip
    assert {k: config.get(k) for k in description} == description, config
    check_series(client, run_id, epochs=2, steps_per_epoch=4)


def test_resnet18_on_a_tiny_image_folder(
    vision_stagewatch: Path, server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    made = subprocess.run(
        [str(VISION_BIN / "python"), "-c", WRITE_IMAGES, str(root)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    # One DataLoader worker: the persistent-worker path, as on a GPU machine.
    result = train(
        vision_stagewatch, tmp_path, "--data", str(root), "--image-size", "32", "--batch-size", "4",
        "--epochs", "1", "--workers", "1", "--server", server.url,
    )  # fmt: skip
    run_id = run_id_of(result)
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "finished", run
    config = run["config"]
    assert config["recipe"] == "resnet18"
    assert config["data"] == str(root.resolve())
    assert (config["test_split"], config["num_classes"], config["num_train"], config["num_test"]) == ("val", 2, 8, 4)
    check_series(client, run_id, epochs=1, steps_per_epoch=2)


def test_resnet18_data_without_train_folder_exits_2(vision_stagewatch: Path, tmp_path: Path) -> None:
    root = tmp_path / "not-a-dataset"
    (root / "val" / "cat").mkdir(parents=True)
    result = train(vision_stagewatch, tmp_path, "--data", str(root), "--server", "http://127.0.0.1:9")
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stagewatch train: --recipe resnet18: "), lines[0]
    assert "no train/ folder" in lines[0] and str(root) in lines[0], lines[0]
