"""Fault test (slow): "every point passed to ``run.log()`` is stored exactly once", through server crashes.

The real server runs as its own OS process (``tests/server_process.py``) and is SIGKILLed ten times while a real
``trainer`` client in this process logs 40,000 points (20,000 steps, two keys), then restarted on the same port:
one kill every 2,000 steps, each right after an ``urgent`` log that wakes the sender. The kills land at different
moments of a batch's life, in turn:

- "at once": right after the log, so the batch it woke is about to be sent, or on its way, to a dead server;
- "on arrival": once the server process has read 16 KiB more (``rchar``): a metric batch's body is arriving;
- "on commit": once the database holds more of the run's points (polled directly, not through the server): the
  batch is committed, and its response is being written or still on its way, so the client may never see it.

After an "at once" kill the next chunk is logged while the client still holds (and retries) that backlog; after the
others the test waits for ``run.flush``. Nothing waits a fixed time: the test waits on conditions only (``/healthz``
after each restart, the server's I/O counters, the database, ``run.flush``). At the end the full CSV export must
hold every (key, step) exactly once with the logged value.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

import trainer
from server.db import make_engine
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

STEPS = 20_000
KEYS = ("loss", "acc")
POINTS = STEPS * len(KEYS)  # 40,000
KILL_EVERY = 2_000  # steps between two kills
KILLS = STEPS // KILL_EVERY  # 10 kill/restart cycles
FLUSH_TIMEOUT_S = 30.0
KILL_MODES = ("at once", "on arrival", "at once", "on commit")  # by cycle, in turn
ARRIVAL_BYTES = 16 * 1024  # read by the server: a metric batch's body, not a command poll (a few hundred bytes)
ACTIVITY_TIMEOUT_S = 15.0
POLL_S = 0.001


def values_at(step: int) -> dict[str, float]:
    """What is logged at ``step``: a deterministic function of it, never the same twice in a row."""
    return {"loss": 1.0 / (step + 1) + 0.001 * (step % 7), "acc": (step * 7919 % 10_007) / 10_007}


def expected_points() -> dict[tuple[str, int], float]:
    return {(key, step): value for step in range(STEPS) for key, value in values_at(step).items()}


def log_chunk(run: trainer.Run, steps: range) -> None:
    """Logs ``steps``; the last one is urgent, so that the sender wakes and posts right away."""
    last = steps[-1]
    for step in steps:
        run.log(values_at(step), step=step, urgent=step == last)


def kill_when(server: ServerProcess, condition: Callable[[], bool], what: str) -> None:
    """SIGKILLs the server as soon as ``condition()`` holds; fails if it does not within ``ACTIVITY_TIMEOUT_S``."""
    deadline = time.monotonic() + ACTIVITY_TIMEOUT_S
    while not condition():
        assert server.running, f"the server died by itself\n{server.output()}"
        assert time.monotonic() < deadline, f"{what} did not happen in {ACTIVITY_TIMEOUT_S:g}s after an urgent log"
        time.sleep(POLL_S)  # the poll interval of this condition, not a delay the test relies on
    server.kill()


def stored_points(engine: Engine, run_id: int) -> int:
    """The run's points committed to the database, read directly (the server may be busy, or dead)."""
    with engine.connect() as connection:
        query = text("SELECT COALESCE(SUM(point_count), 0) FROM series WHERE run_id = :run_id")
        return int(connection.execute(query, {"run_id": run_id}).scalar_one())


def kill_on_arrival(server: ServerProcess, before: dict[str, int]) -> None:
    def arriving() -> bool:
        now = server.io_counters()
        return now is not None and now["rchar"] - before["rchar"] >= ARRIVAL_BYTES

    kill_when(server, arriving, f"the server reading {ARRIVAL_BYTES} bytes (a metric batch arriving)")


def kill_on_commit(server: ServerProcess, engine: Engine, run_id: int, committed: int) -> None:
    kill_when(server, lambda: stored_points(engine, run_id) > committed, "a commit of more points")


@pytest.fixture
def database(migrated_url: str) -> Iterator[Engine]:
    """The test's own connection to the server's database, to watch commits while the server works (or is dead)."""
    engine = make_engine(migrated_url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_points_stored_exactly_once_through_ten_server_kills(
    migrated_url: str, database: Engine, tmp_path: Path
) -> None:
    assert POINTS == 40_000 and KILLS == 10
    started = time.monotonic()
    kills: Counter[str] = Counter()
    with ServerProcess(migrated_url, tmp_path / "server") as server:
        with trainer.start_run(
            server.url, name="faults", spool_dir=tmp_path / "spool", retry_max_s=0.5, timeout=5
        ) as run:
            run_id = run.id
            assert run_id is not None, "the server is up: the run must be created at once"
            for cycle in range(KILLS):
                mode = KILL_MODES[cycle % len(KILL_MODES)]
                before, committed = server.io_counters(), stored_points(database, run_id)
                log_chunk(run, range(cycle * KILL_EVERY, (cycle + 1) * KILL_EVERY))
                if mode == "on arrival" and before is not None:
                    kill_on_arrival(server, before)
                elif mode == "on commit":
                    kill_on_commit(server, database, run_id, committed)
                else:  # "at once", and "on arrival" where /proc/<pid>/io cannot be read (not Linux)
                    server.kill()
                    mode = "at once"
                kills[mode] += 1
                server.start()  # same port; returns once /healthz answers 200
                if mode != "at once":
                    assert run.flush(timeout=FLUSH_TIMEOUT_S), f"cycle {cycle}: flush timed out after a restart"
            assert server.starts == KILLS + 1 and kills.total() == KILLS
            assert run.flush(timeout=FLUSH_TIMEOUT_S), "the final flush timed out with the server up"
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.get(f"/api/v1/runs/{run_id}")
            assert response.status_code == 200, response.text
            body = response.json()
            export = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"})
            assert export.status_code == 200, export.text[:500]
    elapsed = time.monotonic() - started

    lines = export.text.splitlines()
    rows = list(csv.DictReader(io.StringIO(export.text)))
    stored = Counter((row["key"], int(row["step"])) for row in rows)
    expected = expected_points()
    missing = sorted(set(expected) - set(stored), key=lambda p: (p[1], p[0]))
    extra = sorted(set(stored) - set(expected), key=lambda p: (p[1], p[0]))
    duplicated = sorted(p for p, n in stored.items() if n > 1)
    lost_steps = sorted({step for _, step in missing})
    summary = (
        f"run {run_id}, {KILLS} kills {dict(kills)}, {elapsed:.1f}s: {len(rows)} rows exported, expected {POINTS}; "
        f"{len(missing)} points missing ({len(lost_steps)} steps, first {lost_steps[:10]}), "
        f"{len(extra)} unexpected, {len(duplicated)} duplicated; "
        # Counters of the current client, if it still has them: diagnostics only.
        f"client counted {getattr(run, 'points_sent', '?')} accepted, {getattr(run, 'points_rejected', '?')} rejected"
    )

    assert body["status"] == "finished", summary
    assert lines[0] == "key,step,value,epoch,time", summary
    assert len(lines) == POINTS + 1, summary  # the header + 40,000 points
    assert len(set(lines)) == len(lines), summary
    assert not missing and not extra and not duplicated, summary
    assert set(stored) == set(expected) and len(stored) == POINTS, summary
    for key in KEYS:
        assert body["latest"][key]["count"] == STEPS, summary
    wrong = [
        (row["key"], row["step"], row["value"])
        for row in rows
        if not math.isclose(float(row["value"]), expected[row["key"], int(row["step"])], rel_tol=1e-12, abs_tol=1e-15)
    ]
    assert not wrong, f"{len(wrong)} stored values differ from the logged ones, e.g. {wrong[:5]}"
