"""The training client through outages: nothing lost, nothing stored twice, the training loop never hurt.

The server is really absent (nothing listens on the port), or a real HTTP server on the port answers 500,
and then the real app starts on that same port.
"""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import trainer
from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

OUTAGE = "cannot reach the server"


def LiveServerOnPort(settings: Settings, port: int) -> LiveServer:
    """The conftest ``LiveServer``, on a port chosen beforehand."""
    return LiveServer(create_app(settings), port=port)


class Answer500(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"detail": "database is on fire"}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


def log_steps(run: trainer.Run, steps: range) -> float:
    """Logs two keys per step; returns the slowest call in seconds."""
    slowest = 0.0
    for step in steps:
        started = time.perf_counter()
        run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_stored_exactly_once(url: str, run_id: int | None, steps: int) -> None:
    assert run_id is not None
    with httpx.Client(base_url=url, timeout=30) as client:
        body = client.get(f"/api/v1/runs/{run_id}").json()
        assert body["latest"]["loss"]["count"] == steps and body["latest"]["lr"]["count"] == steps
        csv_text = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"}).text
    lines = csv_text.splitlines()
    assert len(lines) == 2 * steps + 1  # header + every point once
    assert len(set(lines)) == len(lines)


def test_server_down_then_up_spills_and_resends_exactly(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="trainer")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    steps = 3_000
    run = trainer.start_run(url, name="offline", spool_dir=tmp_path, max_memory_points=200, retry_max_s=0.5, timeout=2)
    with run:
        assert run.id is None  # nothing listens: the run is created later
        slowest = log_steps(run, range(steps))
        assert slowest < 1.0  # a generous bound: on a loaded CI machine a GC pause is not the network
        wait_for(lambda: run.spool.points_written >= 2 * steps - 200)
        assert (tmp_path / "pending.jsonl").exists()
        assert not run.flush(timeout=0.3)  # still down: flush gives up, nothing is lost
        with LiveServerOnPort(settings, port):
            assert run.flush(timeout=15)
            assert not (tmp_path / "pending.jsonl").exists()
            log_steps(run, range(steps, steps + 10))
            run.close()
            assert_stored_exactly_once(url, run.id, steps + 10)
            assert httpx.get(f"{url}/api/v1/runs/{run.id}").json()["status"] == "finished"
    outage_warnings = [r for r in caplog.records if OUTAGE in r.getMessage()]
    assert len(outage_warnings) == 1  # once per outage, not once per retry


def test_server_answering_500_then_recovering(settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="trainer")
    port = free_port()
    failing = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answer500)
    failing_thread = threading.Thread(target=failing.serve_forever, daemon=True)
    failing_thread.start()
    steps = 2_000
    try:
        run = trainer.start_run(
            f"http://127.0.0.1:{port}", spool_dir=tmp_path, max_memory_points=500, retry_max_s=0.3, timeout=2
        )
        run.__enter__()
        slowest = log_steps(run, range(steps))
        assert slowest < 1.0  # a generous bound: on a loaded CI machine a GC pause is not the network
        time.sleep(1.0)  # several retries against the 500s
        assert run.id is None and run.points_sent == 0
    finally:
        failing.shutdown()
        failing.server_close()
        failing_thread.join(timeout=5)
    with LiveServerOnPort(settings, port) as live:
        assert run.flush(timeout=15)
        run.close()
        assert_stored_exactly_once(live.url, run.id, steps)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(OUTAGE in m for m in messages) == 1
    assert any("database is on fire" in m for m in messages)
    assert not (tmp_path / "pending.jsonl").exists()


def test_log_never_raises_when_the_server_disappears_mid_run(settings: Settings, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with LiveServerOnPort(settings, port):
        run = trainer.start_run(
            url, spool_dir=tmp_path, max_memory_points=100, retry_max_s=0.3, timeout=1, close_timeout_s=1.0
        )
        run.__enter__()
        log_steps(run, range(100))
        assert run.flush(timeout=10)
    # The server is gone; the loop goes on.
    slowest = log_steps(run, range(100, 1100))
    assert slowest < 1.0  # generous: a loaded machine pauses, a blocked network call would take seconds
    started = time.monotonic()
    run.close()
    assert time.monotonic() - started < 10
    assert run.state is trainer.RunState.CLOSED
    # The points the server never acknowledged are all in the spool, for a later resend.
    spooled = (tmp_path / "pending.jsonl").read_text()
    assert spooled.count('"key"') == 2 * 1000


SPOOLING_WORKER = """
import sys, trainer

url, run_id, spool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with trainer.start_run(url, run_id=run_id, spool_dir=spool, retry_max_s=0.2, timeout=1, close_timeout_s=0.5) as run:
    for step in range(1, 501):
        run.log({"loss": 1.0 / step, "lr": 0.1}, step=step)
"""


def test_a_later_process_resends_what_an_earlier_one_spooled(settings: Settings, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with LiveServerOnPort(settings, port):
        run_id = httpx.post(f"{url}/api/v1/runs", json={"name": "resumed"}).json()["id"]
    # The server is down for the whole life of the first process: everything it logs ends in the spool.
    spool = tmp_path / "spool"
    done = subprocess.run(
        [sys.executable, "-c", SPOOLING_WORKER, url, str(run_id), str(spool)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "kept in" in done.stderr  # it said where the points are
    spooled = sum(len(json.loads(line)["points"]) for line in (spool / "pending.jsonl").read_text().splitlines())
    assert spooled == 1000
    # A later process resuming the run (say, from a checkpoint) sends them first, exactly once.
    with LiveServerOnPort(settings, port):
        with trainer.start_run(url, run_id=run_id, spool_dir=spool) as run:
            assert run.flush(timeout=15)
        assert_stored_exactly_once(url, run_id, 500)
    assert not (spool / "pending.jsonl").exists()
