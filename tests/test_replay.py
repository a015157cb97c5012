"""``stagewatch replay``, run as the real console script in a subprocess, on CSV and TensorBoard recordings
written here; its decisions are checked against the same detector fed the same points in-process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from server.cli import main
from server.detectors import make_detector
from server.detectors.feed import Feeder
from server.replay import _plot_indices

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

STAGEWATCH = Path(sys.executable).parent / "stagewatch"
TIMEOUT_S = 60
N = 400
DECAY_AT = 200  # the recorded LR drops from 0.1 to 0.01 at point 200
PARAMS = {"patience": 5, "threshold": 0.001}
DECISION_KEYS = {"step", "action", "factor", "lr", "evidence"}


def stagewatch(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGEWATCH_")}
    return subprocess.run(
        [str(STAGEWATCH), *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def recorded_run() -> tuple[list[int], list[float], list[float]]:
    """Two stages of a loss that flattens out (so that plateau decides), the LR logged with each point."""
    rng = np.random.default_rng(0)
    steps = [10 * i for i in range(N)]
    loss, lrs = [], []
    for i in range(N):
        if i < DECAY_AT:
            value = 1.0 + math.exp(-i / 30)
        else:
            value = 0.5 + 0.5 * math.exp(-(i - DECAY_AT) / 5)
        loss.append(round(value + 0.02 * float(rng.standard_normal()), 6))
        lrs.append(0.1 if i < DECAY_AT else 0.01)
    return steps, loss, lrs


def expected_decisions(
    name: str, params: dict[str, Any], steps: Sequence[int], values: Sequence[float], lrs: Sequence[float] | None
) -> list[dict[str, Any]]:
    """The detector fed in-process by the shared loop: this checks the command line's reading of the file and its
    output, not the loop itself (tests/test_replay_matches_live.py compares replay with the live server)."""
    detector = make_detector(name, {**params, **({"initial_lr": lrs[0]} if lrs else {})})
    points = [(step, value, None) for step, value in zip(steps, values, strict=True)]
    made = Feeder(detector).feed(points, list(zip(steps, lrs, strict=True)) if lrs else [])
    return [json.loads(json.dumps(d.to_dict())) for d in made]


def settings(params: dict[str, Any]) -> list[str]:
    return [arg for key, value in params.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def write_run_csv(path: Path) -> Path:
    steps, loss, lrs = recorded_run()
    lines = ["step,loss,lr,val_acc"]
    for i, (step, value, lr) in enumerate(zip(steps, loss, lrs, strict=True)):
        accuracy = f"{1 - value / 3:.4f}" if i % 10 == 9 else ""  # evaluated every 10 points: empty cells
        lines.append(f"{step},{value!r},{lr!r},{accuracy}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def csv_replay(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One replay of a CSV run with --plot: its output and the plot file."""
    root = tmp_path_factory.mktemp("csv")
    run_csv = write_run_csv(root / "run.csv")
    plot = root / "replay.html"
    args: list[str | Path] = ["--key", "loss", "--plot", plot, run_csv]
    return stagewatch("replay", "--detector", "plateau", *settings(PARAMS), *args, cwd=root), plot


def test_csv_replay_matches_the_detector_in_process(csv_replay: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    lines = ok(csv_replay[0])
    steps, loss, lrs = recorded_run()
    assert lines == expected_decisions("plateau", PARAMS, steps, loss, lrs)
    assert len(lines) >= 4
    assert all(set(line) == DECISION_KEYS and line["action"] in ("decay", "stop") for line in lines)
    assert all(isinstance(line["step"], int) and isinstance(line["evidence"]["explanation"], str) for line in lines)
    # The LR comes from the recording: 0.1 at first, then the recorded change to 0.01 resets it.
    assert lines[0]["lr"] == pytest.approx(0.01)
    first_after_change = next(line for line in lines if line["step"] >= steps[DECAY_AT])
    assert first_after_change["lr"] == pytest.approx(0.001)


def test_plot_is_self_contained(csv_replay: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, plot = csv_replay
    assert ok(result)
    page = plot.read_text(encoding="utf-8")
    assert "plotly.js v" in page and len(page) > 1_000_000  # the whole bundle is embedded
    assert re.search(r"<script[^>]*\bsrc\s*=", page) is None  # no script is fetched: no CDN
    for name in ('"name":"loss"', '"name":"lr"', '"name":"decay"'):
        assert name in page
    assert "stage 1" in page and "stage 2" in page and "stage 3" not in page  # one band per recorded LR
    assert "No improvement over the best" in page  # the evidence sentence, on hover
    assert f"wrote {plot}: 2 stages" in result.stderr


def test_long_format_export_and_another_detector(tmp_path: Path) -> None:
    """Stagewatch's own export (key,step,value,epoch,time; one row per point) replays like a wide CSV."""
    steps, loss, lrs = recorded_run()
    rows = ["key,step,value,epoch,time"]
    rows += [f"lr,{s},{lr!r},," for s, lr in zip(steps, lrs, strict=True)]
    rows += [f"train/loss,{s},{v!r},,{1.7e9 + s}" for s, v in zip(steps, loss, strict=True)]
    export = tmp_path / "export.csv"
    export.write_text("\n".join(rows) + "\n")
    lines = ok(stagewatch("replay", "--detector", "autodecay", export, cwd=tmp_path))  # the only key besides lr
    assert lines == expected_decisions("autodecay", {}, steps, loss, lrs)
    assert lines, "autodecay found no stage end in a run with two clear stages"


def write_event_log(directory: Path, series: dict[str, Sequence[float]], steps: Sequence[int]) -> None:
    """A real TensorBoard event file, as ``SummaryWriter.add_scalar`` writes it (simple_value)."""
    writer = EventFileWriter(str(directory))
    for i, step in enumerate(steps):
        values = [Summary.Value(tag=tag, simple_value=float(v[i])) for tag, v in series.items()]
        writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=values)))
    writer.close()


def float32(values: Sequence[float]) -> list[float]:
    return [float(np.float32(v)) for v in values]  # what simple_value stores


def test_tensorboard_replay_with_tag(tmp_path: Path) -> None:
    steps, loss, lrs = recorded_run()
    log = tmp_path / "logs"
    write_event_log(log, {"train/loss": loss, "lr": lrs, "val/acc": [1 - v / 3 for v in loss]}, steps)
    lines = ok(
        stagewatch("replay", "--detector", "plateau", *settings(PARAMS), "--tag", "train/loss", log, cwd=tmp_path)
    )
    assert lines == expected_decisions("plateau", PARAMS, steps, float32(loss), float32(lrs))
    assert len(lines) >= 4 and lines[0]["lr"] == pytest.approx(0.01)
    # The learning-rate tag can be named.
    renamed = tmp_path / "renamed"
    write_event_log(renamed, {"loss": loss, "opt/lr": lrs}, steps)
    args: list[str | Path] = ["--tag", "loss", "--lr-tag", "opt/lr", renamed]
    assert ok(stagewatch("replay", "--detector", "plateau", *settings(PARAMS), *args, cwd=tmp_path)) == lines


def test_tensorboard_tensor_scalars_from_one_event_file(tmp_path: Path) -> None:
    """TF2's tf.summary.scalar stores tensors under the scalars plugin; an event file can be given directly."""
    steps, loss, _ = recorded_run()
    writer = EventFileWriter(str(tmp_path / "tf2"))
    for step, value in zip(steps, loss, strict=True):
        writer.add_event(Event(step=step, wall_time=time.time(), summary=scalar_pb("epoch_loss", value)))
    writer.close()
    (event_file,) = (tmp_path / "tf2").iterdir()
    lines = ok(stagewatch("replay", "--detector", "plateau", *settings(PARAMS), event_file, cwd=tmp_path))
    assert lines == expected_decisions("plateau", PARAMS, steps, float32(loss), None)
    assert lines and all(line["lr"] is None for line in lines)  # no LR recorded: none known


# --- errors: every one exits 2 with one line naming the problem, never a traceback --------------------------

# Run as the real console script (each a process of its own, all at once).
PROCESS_ERRORS: dict[str, tuple[list[str], str]] = {
    "unknown detector": (["--detector", "nope", "--key", "loss", "run.csv"], "unknown detector 'nope'"),
    "unknown parameter": (["--detector", "plateau", "--set", "bogus=1", "--key", "loss", "run.csv"], "bogus"),
    "malformed --set": (["--detector", "plateau", "--set", "patience", "--key", "loss", "run.csv"], "KEY=VALUE"),
    "missing input": (["--detector", "plateau", "missing.csv"], "missing.csv: no such file or directory"),
    "unreadable input": (["--detector", "plateau", "binary.csv"], "binary.csv: not a UTF-8"),
    "missing column": (["--detector", "plateau", "--key", "accuracy", "run.csv"], "no column 'accuracy'"),
    "missing tag": (["--detector", "plateau", "--tag", "nope", "logs"], "no tag 'nope'"),
    "no numeric data": (["--detector", "plateau", "nodata.csv"], "'loss' has no numeric data"),
    "non-increasing steps": (["--detector", "plateau", "unordered.csv"], "step 10 follows step 20"),
}
# The same checks through ``server.cli.main`` in this process: the same code, without a process start each.
MORE_ERRORS: dict[str, tuple[list[str], str]] = {
    "invalid parameter": (
        ["--detector", "plateau", "--set", "patience=-1", "--key", "loss", "run.csv"],
        "patience: Input should",
    ),
    "repeated --set": (
        ["--detector", "plateau", "--set", "patience=1", "--set", "patience=2", "run.csv"],
        "more than once",
    ),
    "empty input": (["--detector", "plateau", "empty.csv"], "empty CSV"),
    "no step column": (["--detector", "plateau", "nostep.csv"], "no 'step' column"),
    "ragged row": (["--detector", "plateau", "ragged.csv"], "line 3 has 3 cells"),
    "ambiguous column": (["--detector", "plateau", "run.csv"], "choose one with --key: 'loss', 'val_acc'"),
    "missing lr column": (
        ["--detector", "plateau", "--key", "loss", "--lr-tag", "rate", "run.csv"],
        "no column 'rate'",
    ),
    "not a number": (["--detector", "plateau", "text.csv"], "line 3, column 'loss': 'abc' is not a number"),
    "non-integer step": (["--detector", "plateau", "halfstep.csv"], "step '0.5' is not an integer"),
    "ambiguous tag": (["--detector", "plateau", "logs"], "choose one with --tag: 'train/loss', 'val/loss'"),
    "no scalars": (["--detector", "plateau", "emptydir"], "emptydir: no TensorBoard scalars found"),
    "nested runs": (["--detector", "plateau", "nested"], "event files are in: nested/run1"),
    "plot directory": (["--detector", "plateau", "--key", "loss", "--plot", "no/x.html", "run.csv"], "does not exist"),
    "key and tag differ": (["--detector", "plateau", "--key", "loss", "--tag", "lr", "run.csv"], "--key and --tag"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    (root / "run.csv").write_text("step,loss,lr,val_acc\n0,1.0,0.1,\n10,0.9,0.1,0.5\n")
    (root / "binary.csv").write_bytes(b"step,loss\n\xff\xfe\x00\x81\n")
    (root / "empty.csv").write_text("")
    (root / "nostep.csv").write_text("epoch,loss\n0,1.0\n")
    (root / "ragged.csv").write_text("step,loss\n0,1.0\n10,0.9,7\n")
    (root / "nodata.csv").write_text("step,loss\n0,\n10,\n")
    (root / "text.csv").write_text("step,loss\n0,1.0\n10,abc\n")
    (root / "halfstep.csv").write_text("step,loss\n0.5,1.0\n")
    (root / "unordered.csv").write_text("step,loss\n0,1.0\n20,0.9\n10,0.8\n")
    write_event_log(root / "logs", {"train/loss": [1.0, 0.9], "val/loss": [1.1, 1.0]}, [0, 10])
    (root / "emptydir").mkdir()
    write_event_log(root / "nested" / "run1", {"loss": [1.0, 0.9]}, [0, 10])
    return root


@pytest.fixture(scope="module")
def process_errors(bad_inputs: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=len(PROCESS_ERRORS)) as pool:
        futures = {
            name: pool.submit(stagewatch, "replay", *args, cwd=bad_inputs) for name, (args, _) in PROCESS_ERRORS.items()
        }
        return {name: future.result() for name, future in futures.items()}


def assert_one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stagewatch replay: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(PROCESS_ERRORS))
def test_console_script_errors(case: str, process_errors: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = process_errors[case]
    assert_one_line_error(result.returncode, result.stdout, result.stderr, PROCESS_ERRORS[case][1])


@pytest.mark.parametrize("case", sorted(MORE_ERRORS))
def test_more_errors(
    case: str, bad_inputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(bad_inputs)
    args, expected = MORE_ERRORS[case]
    code = main(["replay", *args])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.out, captured.err, expected)


def test_argument_errors_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "run.csv"])  # no --detector
    assert exit_info.value.code == 2 and "--detector" in capsys.readouterr().err


def test_long_curves_are_plotted_with_their_spikes() -> None:
    """Beyond MAX_PLOT_POINTS the plotted curve keeps each bucket's extremes, its NaNs and the last point."""
    values = [1.0 + 0.001 * (i % 7) for i in range(50_000)]
    values[12_345], values[33_333], values[40_000] = 50.0, -50.0, math.nan
    keep = _plot_indices(values, 1001)
    assert len(keep) <= 1001 and keep == sorted(set(keep))
    assert {12_345, 33_333, 40_000, 49_999} <= set(keep)
    assert _plot_indices(values[:1000], 1001) == list(range(1000))
