"""The client's delivery guarantee across crashes and resumes: every point once, with the values of the job
that the run's history says produced it.

Each test runs real processes: a worker script in a subprocess (killed with SIGKILL where the scenario says
so) and the real app under uvicorn on a fixed port, stopped and started again on that port for outages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import trainer
from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

WORKER = """
import json, sys, threading, pathlib, trainer

args = json.loads(sys.argv[1])
out = pathlib.Path(args["out"])
def value(step): return args["scale"] / (step + 1)
with trainer.start_run(args["url"], **args["run"]) as run:
    (out / "id").write_text(str(run.id))
    for phase in args["phases"]:
        if "wait_for" in phase:  # the test changes the world (stops the server), then says go
            while not (out / phase["wait_for"]).exists():
                threading.Event().wait(0.02)
        for step in range(*phase["steps"]):
            run.log({"loss": value(step), "lr": 0.1}, step=step)
        if phase.get("flush"):
            assert run.flush(timeout=30)
        if phase.get("checkpoint"):
            run.checkpoint(timeout=1)
        (out / phase["done"]).touch()
    if args.get("hang"):  # alive with points in memory until the test kills it
        threading.Event().wait()
"""


class Worker:
    """A worker script in a subprocess, driven by marker files in ``out``."""

    def __init__(self, out: Path, url: str, run: dict[str, Any], phases: list[dict[str, Any]], **extra: Any) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        spec = {"out": str(out), "url": url, "run": run, "phases": phases, "scale": 1.0, **extra}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(spec)], stderr=subprocess.PIPE, text=True
        )

    def wait_marker(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.out / name).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the worker exited ({self.proc.returncode}): {self.proc.stderr.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"the worker never reached {name}"
            time.sleep(0.02)

    def go(self, name: str) -> None:
        (self.out / name).touch()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)

    def finish(self) -> str:
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return err

    @property
    def run_id(self) -> int:
        return int((self.out / "id").read_text())


def stored(url: str, run_id: int) -> dict[tuple[str, int], float]:
    """Every stored (key, step) -> value of a run, asserting none appears twice."""
    text = httpx.get(f"{url}/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"}, timeout=60).text
    rows = list(csv.DictReader(io.StringIO(text)))
    points = {(r["key"], int(r["step"])): float(r["value"]) for r in rows}
    assert len(points) == len(rows), "a point is stored twice"
    return points


def run_of(url: str, run_id: int) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/api/v1/runs/{run_id}", timeout=30).json()
    return body


def expected(steps: range, scale: float = 1.0) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for step in steps:
        out["loss", step] = scale / (step + 1)
        out["lr", step] = 0.1
    return out


def assert_points(actual: dict[tuple[str, int], float], want: dict[tuple[str, int], float]) -> None:
    assert actual.keys() == want.keys(), (
        f"missing {len(want.keys() - actual.keys())}, unexpected {len(actual.keys() - want.keys())}"
    )
    wrong = [k for k, v in want.items() if abs(actual[k] - v) > 1e-12 * max(1.0, abs(v))]
    assert not wrong, f"{len(wrong)} points have another job's values, e.g. {wrong[:3]}"


@pytest.fixture
def port() -> int:
    return free_port()


def serve(settings: Settings, port: int) -> LiveServer:
    return LiveServer(create_app(settings), port=port)


def test_resume_with_rewind_and_a_leftover_spool(settings: Settings, port: int, tmp_path: Path):
    """A crashes with points in its spool; B resumes from A's checkpoint at step 4,000 with other values.

    Expected: steps 0..4,000 hold A's values (those A had only spooled included), 4,001..7,999 B's, each
    once: 16,000 points; nothing refused."""
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    tuning: dict[str, Any] = {"spool_dir": str(spool), "retry_max_s": 0.2, "timeout": 2, "max_memory_points": 300}
    with serve(settings, port):
        a = Worker(
            tmp_path / "a",
            url,
            {"name": "resumable", **tuning},
            [
                {"steps": [0, 2000], "flush": True, "done": "delivered"},
                {"wait_for": "server-down", "steps": [2000, 4001], "checkpoint": True, "done": "checkpointed"},
                {"steps": [4001, 6000], "done": "beyond"},  # spooled or in memory, then lost with the process
            ],
            hang=True,
        )
        a.wait_marker("delivered")
    a.go("server-down")
    a.wait_marker("beyond")
    a.kill()
    whole = (spool / "pending.jsonl").read_bytes().split(b"\n")[:-1]  # the kill may have cut the last line
    assert sum(len(json.loads(line)["points"]) for line in whole) >= 2 * 2001  # the checkpoint wrote 2000..4000
    with serve(settings, port):
        with trainer.start_run(url, run_id=a.run_id, resume_step=4000, **tuning) as b:
            for step in range(4001, 8000):
                b.log({"loss": 2.0 / (step + 1), "lr": 0.1}, step=step)
            assert b.flush(timeout=30)
        points = stored(url, a.run_id)
        rewinds = httpx.get(f"{url}/api/v1/runs/{a.run_id}/rewinds").json()["data"]
        status = run_of(url, a.run_id)["status"]
    assert_points(points, expected(range(4001)) | expected(range(4001, 8000), scale=2.0))
    assert len(points) == 16_000
    assert [r["step"] for r in rewinds] == [4000]
    assert status == "finished"
    assert not spool.exists(), "everything was delivered: the spool is gone"


def test_a_rewind_made_over_rest_is_respected_by_the_leftover_spool(settings: Settings, port: int, tmp_path: Path):
    """The README's older recipe: the user rewinds over REST, then resumes without ``resume_step``. The dead
    process's spooled points after the rewind step are not resent (they would clash with the new job's)."""
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    tuning: dict[str, Any] = {"spool_dir": str(spool), "retry_max_s": 0.2, "timeout": 2, "max_memory_points": 100}
    with serve(settings, port):
        a = Worker(
            tmp_path / "a",
            url,
            {"name": "rest-rewind", **tuning},
            [
                {"steps": [0, 1000], "flush": True, "done": "delivered"},
                {"wait_for": "server-down", "steps": [1000, 3000], "checkpoint": True, "done": "spooled"},
            ],
            hang=True,
        )
        a.wait_marker("delivered")
    a.go("server-down")
    a.wait_marker("spooled")
    a.kill()
    with serve(settings, port):
        answer = httpx.post(f"{url}/api/v1/runs/{a.run_id}/rewind", json={"step": 1500, "reason": "ckpt-1500"})
        assert answer.status_code == 200, answer.text
        with trainer.start_run(url, run_id=a.run_id, **tuning) as b:
            for step in range(1501, 2500):
                b.log({"loss": 2.0 / (step + 1), "lr": 0.1}, step=step)
            assert b.flush(timeout=30)
        points = stored(url, a.run_id)
    assert_points(points, expected(range(1501)) | expected(range(1501, 2500), scale=2.0))
    assert not (spool / "rejected.jsonl").exists()


def test_a_run_started_while_the_server_was_down_is_delivered_by_the_next_process(
    settings: Settings, port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A starts and ends while the server is down: its run never existed on the server. The next process on
    the same spool root (a new run of its own) creates A's run by its client key and delivers all of it,
    final status included: 3,000 + 500 points in two runs, nothing stranded."""
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "spool-root"
    a = Worker(
        tmp_path / "a",
        url,
        {"name": "offline-start", "spool_root": str(root), "retry_max_s": 0.2, "timeout": 1, "close_timeout_s": 1},
        [{"steps": [0, 1500], "done": "logged"}],
    )
    err = a.finish()
    assert "delivered by the next process" in err
    (leftover,) = [p for p in root.iterdir() if p.is_dir()]
    assert json.loads((leftover / "meta.json").read_text())["final_status"] == "finished"
    with serve(settings, port), caplog.at_level(logging.WARNING, logger="trainer"):
        with trainer.start_run(url, name="next", options=trainer.RunOptions(spool_root=root)) as b:
            for step in range(250):
                b.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
            assert b.flush(timeout=30)
        b_id = b.id
        assert b_id is not None
        runs = httpx.get(f"{url}/api/v1/runs", params={"limit": 10}).json()["data"]
        by_name = {r["name"]: r for r in runs}
        assert set(by_name) == {"offline-start", "next"}
        a_points = stored(url, by_name["offline-start"]["id"])
        b_points = stored(url, b_id)
        a_status = by_name["offline-start"]["status"]
    assert_points(a_points, expected(range(1500)))
    assert_points(b_points, expected(range(250)))
    assert a_status == "finished"
    assert not leftover.exists()
    assert any("delivered what run" in r.getMessage() for r in caplog.records)


def test_a_job_restarted_with_its_client_key_continues_the_run_it_never_created(
    settings: Settings, port: int, tmp_path: Path
):
    """A, with client_key "job-7", runs entirely during an outage and is killed after a checkpoint at step
    999. B restarts with the same key and resume_step=999: one run, A's 1,000 steps then B's, each once."""
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    run: dict[str, Any] = {
        "client_key": "job-7",
        "name": "keyed",
        "spool_dir": str(spool),
        "retry_max_s": 0.2,
        "timeout": 1,
    }
    a = Worker(
        tmp_path / "a",
        url,
        run,
        [{"steps": [0, 1000], "checkpoint": True, "done": "checkpointed"}, {"steps": [1000, 1400], "done": "more"}],
        hang=True,
    )
    a.wait_marker("more")
    a.kill()
    with serve(settings, port):
        with trainer.start_run(url, resume_step=999, **run) as b:
            for step in range(1000, 2000):
                b.log({"loss": 2.0 / (step + 1), "lr": 0.1}, step=step)
            assert b.flush(timeout=30)
        runs = httpx.get(f"{url}/api/v1/runs").json()["data"]
        assert len(runs) == 1 and runs[0]["client_key"] == "job-7" and runs[0]["id"] == b.id
        points = stored(url, runs[0]["id"])
    assert_points(points, expected(range(1000)) | expected(range(1000, 2000), scale=2.0))


def test_a_torn_last_line_is_skipped_with_a_warning_never_glued(
    settings: Settings, port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A crash in the middle of a spool write leaves half a line. The next process skips it (warning), sends
    every whole line and its own points; nothing refused, no retry loop."""
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    run: dict[str, Any] = {
        "client_key": "torn",
        "spool_dir": str(spool),
        "retry_max_s": 0.2,
        "timeout": 1,
        "batch_points": 100,
    }
    a = Worker(tmp_path / "a", url, run, [{"steps": [0, 1000], "checkpoint": True, "done": "spooled"}], hang=True)
    a.wait_marker("spooled")
    a.kill()
    pending = spool / "pending.jsonl"
    lines = pending.read_bytes().splitlines(keepends=True)
    whole = [json.loads(line)["points"] for line in lines[:-1]]
    cut = lines[-1][: len(lines[-1]) // 2]  # the write the crash interrupted
    pending.write_bytes(b"".join(lines[:-1]) + cut)
    want = {(p["key"], p["step"]): p["value"] for batch in whole for p in batch}
    with serve(settings, port), caplog.at_level(logging.WARNING, logger="trainer"):
        with trainer.start_run(url, **run) as b:
            for step in range(1000, 1100):
                b.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
            assert b.flush(timeout=30)
        assert b.points_rejected == 0
        points = stored(url, b.id)  # type: ignore[arg-type]
    assert_points(points, want | expected(range(1000, 1100)))
    assert len(points) == len(want) + 200 == 2000 - len(json.loads(lines[-1])["points"]) + 200
    assert any("cut short by a crash" in r.getMessage() for r in caplog.records)


class RefuseOnce:
    """A listener on the port that accepts connections and drops them (a server that is not up yet), counting
    how many it saw; ``stop`` frees the port for the real server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


def test_close_during_an_outage_retries_the_final_status(settings: Settings, port: int, tmp_path: Path):
    """The server is away when the job ends: close() retries the status with backoff and it lands when the
    server is back within close_timeout_s."""
    url = f"http://127.0.0.1:{port}"
    with serve(settings, port):
        run = trainer.start_run(url, spool_dir=tmp_path, retry_max_s=0.3, timeout=2, close_timeout_s=60)
        run.__enter__()
        run.log({"loss": 1.0}, step=0)
        assert run.flush(timeout=30)
    refuse = RefuseOnce(port)
    closer = threading.Thread(target=run.close)
    closer.start()
    deadline = time.monotonic() + 30
    while refuse.accepted < 1:  # close() has tried at least once and failed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    refuse.stop()
    with serve(settings, port):
        closer.join(timeout=60)
        assert not closer.is_alive()
        assert run_of(url, run.id)["status"] == "finished"  # type: ignore[arg-type]
    assert not (tmp_path / "meta.json").exists()


def test_close_with_the_server_gone_records_the_status_for_the_next_process(
    settings: Settings, port: int, tmp_path: Path
):
    """The server stays away past close_timeout_s: points and final status wait in the spool; the next process
    opening that spool (another run) delivers both: 1,000 points, status failed."""
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    with serve(settings, port):
        run = trainer.start_run(url, spool_dir=spool, retry_max_s=0.2, timeout=1, close_timeout_s=1)
        run.__enter__()
        first = run.id
        assert first is not None
    for step in range(500):
        run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    run.close("failed")
    assert json.loads((spool / "meta.json").read_text())["final_status"] == "failed"
    with serve(settings, port):
        assert run_of(url, first)["status"] == "running"
        with trainer.start_run(url, spool_dir=spool, name="next") as nxt:
            assert nxt.flush(timeout=30)
        # The orphan is delivered after the new run's own data; close() waits for neither, so wait here.
        deadline = time.monotonic() + 30
        while run_of(url, first)["status"] != "failed":
            assert time.monotonic() < deadline, run_of(url, first)
            time.sleep(0.05)
        points = stored(url, first)
    assert_points(points, expected(range(500)))


def test_a_new_run_never_takes_over_the_run_whose_status_its_spool_still_owes(
    settings: Settings, port: int, tmp_path: Path
):
    """Run A stored every point but the server went away before its final status: only the status is owed. A new
    run opening that spool directory is a run of its own (never A), and delivers A's status."""
    url = f"http://127.0.0.1:{port}"
    with serve(settings, port):
        a = trainer.start_run(url, spool_dir=tmp_path, retry_max_s=0.2, timeout=1, close_timeout_s=0.5)
        a.__enter__()
        a.log({"loss": 1.0}, step=0)
        assert a.flush(timeout=30)
    a.close("failed")
    assert json.loads((tmp_path / "meta.json").read_text())["final_status"] == "failed"
    with serve(settings, port):
        with trainer.start_run(url, spool_dir=tmp_path, name="b") as b:
            b.log({"loss": 2.0}, step=0)
            assert b.flush(timeout=30)
        assert b.id is not None and a.id is not None and b.id != a.id
        deadline = time.monotonic() + 30
        while run_of(url, a.id)["status"] != "failed":
            assert time.monotonic() < deadline, run_of(url, a.id)
            time.sleep(0.05)
        assert stored(url, b.id) == {("loss", 0): 2.0}
        assert stored(url, a.id) == {("loss", 0): 1.0}


def test_no_thread_outlives_close_over_100_runs(settings: Settings, port: int, tmp_path: Path):
    """A sweep of 100 runs in one process, half of them closed while the server is down: afterwards the
    process has exactly the threads it had before."""
    url = f"http://127.0.0.1:{port}"
    before = {t.ident for t in threading.enumerate()}

    def sweep(n: int, prefix: str) -> None:
        for i in range(n):
            with trainer.start_run(
                url, name=f"{prefix}-{i}", spool_dir=tmp_path / f"{prefix}-{i}", retry_max_s=0.2, timeout=1,
                close_timeout_s=0.2, command_wait_s=5,
            ) as run:  # fmt: skip
                run.log({"loss": 1.0}, step=0)

    client_threads = {"stagewatch-sender", "stagewatch-spiller", "stagewatch-commands"}

    def leftover() -> list[str]:
        return [t.name for t in threading.enumerate() if t.ident not in before and t.name in client_threads]

    with serve(settings, port):
        sweep(50, "up")
        assert leftover() == []
    sweep(50, "down")
    assert leftover() == []


def test_two_live_processes_cannot_share_a_spool(tmp_path: Path, server: LiveServer):
    with (
        trainer.start_run(server.url, spool_dir=tmp_path),
        pytest.raises(trainer.RunStateError, match="held by another live process"),
    ):
        trainer.start_run(server.url, spool_dir=tmp_path).__enter__()


def test_resume_step_needs_a_run(tmp_path: Path):
    with pytest.raises(ValueError, match="resume_step needs the run"):
        trainer.start_run("http://127.0.0.1:9", resume_step=10, spool_dir=tmp_path)
    assert not os.listdir(tmp_path)
