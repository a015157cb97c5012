"""Two server processes on one PostgreSQL database (server.replicas): what one commits wakes the waiters of the
other through LISTEN/NOTIFY, and detection passes of one run take turns through an advisory lock.

Both processes run with ``STAGEWATCH_RECHECK_S=600``: a waiter that nothing wakes would read the database again
only after ten minutes, so an event or a command that arrives is one that a notification delivered.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

import trainer
from server.replicas import PASS_LOCK
from tests.conftest import free_port
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("migrated_url", ["postgres"], indirect=True)]

NO_RECHECK = {"STAGEWATCH_RECHECK_S": "600"}
TIMEOUT_S = 60.0  # a bound on each wait, far above what any of them takes
DETECTOR = {
    "name": "autodecay",
    "metric": "epoch/train_loss",
    "params": {"min_stage": 6, "confirm": 1, "min_window_blocks": 3, "max_decays": 2, "smooth": 1, "rho": 0.2},
}


@pytest.fixture
def replicas(migrated_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a = ServerProcess(migrated_url, tmp_path / "a", env=NO_RECHECK)
    b = ServerProcess(migrated_url, tmp_path / "b", env=NO_RECHECK)
    with a, b:
        yield a, b


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_run(base: str, **fields: Any) -> int:
    response = httpx.post(f"{base}/api/v1/runs", json={"name": "replicated", **fields}, timeout=TIMEOUT_S)
    assert response.status_code == 201, response.text
    run_id: int = response.json()["id"]
    return run_id


def ingest(base: str, run_id: int, points: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{base}/api/v1/runs/{run_id}/metrics", json={"points": points}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def pass_lock_held(url: str, run_id: int) -> Iterator[Callable[[int], None]]:
    """Holds the run's detection-pass lock (as a pass of another replica would); yields ``wait_blocked(n)``, which
    returns once ``n`` passes wait for it (PostgreSQL's own view, ``pg_locks``). Released on exit."""
    waiting_sql = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND NOT granted"
    )
    with (
        psycopg.connect(libpq(url), autocommit=True) as holder,
        psycopg.connect(libpq(url), autocommit=True) as probe,
    ):
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (PASS_LOCK, run_id))

        def wait_blocked(count: int) -> None:
            deadline = time.monotonic() + TIMEOUT_S
            while (waiting := probe.execute(waiting_sql, (PASS_LOCK, run_id)).fetchone()) != (count,):
                assert time.monotonic() < deadline, f"{waiting} passes wait for the run's lock, not {count}"
                time.sleep(0.05)  # polling PostgreSQL's view of the locks; the condition decides, not the time

        try:
            yield wait_blocked
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s, %s)", (PASS_LOCK, run_id))


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """``(event, data)`` as a live stream sends them."""
    event, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "":
            if data:
                yield event, data
            event, data = "message", ""


def test_a_batch_ingested_on_one_replica_reaches_a_stream_on_the_other(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    run_id = create_run(a.url)
    with (
        httpx.Client(timeout=TIMEOUT_S) as client,
        client.stream("GET", f"{b.url}/api/v1/runs/{run_id}/stream") as stream,
    ):
        events = sse_events(stream)
        assert next(events)[0] == "hello"
        ingest(a.url, run_id, [{"key": "loss", "step": 1, "value": 0.5}])
        # The first batch may be found by the stream's first read; once it is delivered, the stream has read the
        # database and waits: the second batch can only reach it through a notification.
        assert '"last_step":1' in next(e for e in events if e[0] == "points")[1]
        ingest(a.url, run_id, [{"key": "loss", "step": 2, "value": 0.4}])
        assert '"last_step":2' in next(e for e in events if e[0] == "points")[1]


def test_a_command_posted_on_one_replica_reaches_a_long_poll_on_the_other(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    run_id = create_run(a.url)
    answer: dict[str, Any] = {}

    def long_poll() -> None:
        answer["response"] = httpx.get(f"{b.url}/api/v1/runs/{run_id}/commands", params={"wait": 30}, timeout=TIMEOUT_S)

    poller = threading.Thread(target=long_poll)
    poller.start()
    posted = httpx.post(
        f"{a.url}/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.1}, timeout=TIMEOUT_S
    )
    assert posted.status_code == 201, posted.text
    poller.join(TIMEOUT_S)
    response = answer["response"]
    assert response.status_code == 200, response.text
    # Returned with the command, not empty at the end of its 30 s: B read it either before A committed (then
    # it waited, with no re-check for ten minutes) or after a notification woke it.
    assert [c["id"] for c in response.json()["data"]] == [posted.json()["id"]]


def test_passes_of_one_run_take_turns_across_replicas(
    replicas: tuple[ServerProcess, ServerProcess], migrated_url: str
) -> None:
    """While a pass of the run holds its advisory lock (here: the test holds it), a pass that either replica
    starts for that run waits for it; released, both catch up."""
    a, b = replicas
    run_id = create_run(a.url, detector=DETECTOR, mode="observe")
    with pass_lock_held(migrated_url, run_id) as wait_blocked:
        ingest(a.url, run_id, [{"key": "epoch/train_loss", "step": 10, "value": 1.0, "epoch": 1.0}])
        ingest(b.url, run_id, [{"key": "epoch/train_loss", "step": 20, "value": 0.9, "epoch": 2.0}])
        wait_blocked(2)  # a pass that ignored the lock would have run instead
        progress = httpx.get(f"{a.url}/api/v1/runs/{run_id}/detection", timeout=TIMEOUT_S).json()
        assert progress["through_step"] is None, progress  # nothing examined while the lock is held
    for server in (a, b):
        caught_up = httpx.get(
            f"{server.url}/api/v1/runs/{run_id}/detection", params={"wait": 30}, timeout=TIMEOUT_S
        ).json()
        assert caught_up["through_step"] == 20, caught_up


# --- the balancer: Debian's HAProxy with deploy/haproxy.cfg, as docker-compose.yml runs it ---------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


@contextlib.contextmanager
def balancer(replicas: Sequence[ServerProcess], log_dir: Path) -> Iterator[str]:
    """HAProxy with the shipped configuration in front of ``replicas``; yields its URL once it answers."""
    port = free_port()
    env = {**os.environ, "STAGEWATCH_BIND": f"127.0.0.1:{port}"}
    env.update({f"STAGEWATCH_REPLICA_{i}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas, start=1)})
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "haproxy.log").open("ab") as out:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # until it answers through a replica it has found healthy
            assert proc.poll() is None, (log_dir / "haproxy.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the balancer never answered /readyz"
            time.sleep(0.05)  # polling a condition
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Its health checks passed on the replicas that were up (a check the server refuses takes them all out).
    assert "wrong status" not in (log_dir / "haproxy.log").read_text()


def test_a_worker_through_the_balancer_survives_a_replica_killed_mid_run(
    replicas: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    """A real worker streams through HAProxy while one replica is SIGKILLed and restarted: every point is
    stored once, and a command posted through the balancer reaches the worker and is acknowledged."""
    a, b = replicas
    steps = 600
    with balancer(replicas, tmp_path / "haproxy") as url:
        with trainer.start_run(url, name="through-the-balancer", spool_dir=tmp_path / "spool") as run:
            for step in range(steps // 2):
                run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
            assert run.flush(timeout=TIMEOUT_S)
            a.kill()  # SIGKILL: requests in flight on it are cut off
            for step in range(steps // 2, steps):
                run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
            assert run.flush(timeout=TIMEOUT_S)
            a.start()
            posted = httpx.post(
                f"{url}/api/v1/runs/{run.id}/commands", json={"action": "decay", "factor": 0.5}, timeout=TIMEOUT_S
            )
            assert posted.status_code == 201, posted.text
            deadline = time.monotonic() + TIMEOUT_S
            while not (pending := run.pending_commands()):
                assert time.monotonic() < deadline, "the command never reached the worker"
                time.sleep(0.05)  # polling the client's inbox, filled by its own long-poll
            assert [c.id for c in pending] == [posted.json()["id"]]
            run.ack_command(pending[0].id, status="applied", step=steps, lr=0.05)
            assert run.flush(timeout=TIMEOUT_S)
        run_id = run.id
    for server in (a, b):  # either replica, asked directly, has the same complete run
        for key in ("loss", "lr"):
            exported = httpx.get(
                f"{server.url}/api/v1/runs/{run_id}/metrics/export",
                params={"format": "jsonl", "key": key},
                timeout=TIMEOUT_S,
            )
            assert [json.loads(line)["step"] for line in exported.text.splitlines()] == list(range(steps)), key
        unacknowledged = httpx.get(f"{server.url}/api/v1/runs/{run_id}/commands", timeout=TIMEOUT_S)
        assert unacknowledged.json()["data"] == []
        assert httpx.get(f"{server.url}/api/v1/runs/{run_id}", timeout=TIMEOUT_S).json()["status"] == "finished"


def test_a_replica_killed_mid_pass_loses_and_duplicates_nothing(
    replicas: tuple[ServerProcess, ServerProcess], migrated_url: str
) -> None:
    """Replica A's pass is inside its transaction (waiting for the run's lock, held here) when A is SIGKILLed: the
    transaction dies with it, and B's next pass examines every point, once."""
    a, b = replicas
    run_id = create_run(a.url, detector=DETECTOR, mode="observe")
    losses = [1.0 / (epoch + 1) for epoch in range(40)]  # a curve the detector decides on
    with pass_lock_held(migrated_url, run_id) as wait_blocked:
        ingest(a.url, run_id, [
            {"key": key, "step": 10 * (e + 1), "value": v if key != "lr" else 0.1, "epoch": float(e + 1)}
            for e, v in enumerate(losses[:20])
            for key in ("lr", "epoch/train_loss")
        ])  # fmt: skip
        wait_blocked(1)  # A's pass is inside its transaction
        a.kill()
    ingest(b.url, run_id, [
        {"key": key, "step": 10 * (e + 1), "value": v if key != "lr" else 0.1, "epoch": float(e + 1)}
        for e, v in enumerate(losses[20:], start=20)
        for key in ("lr", "epoch/train_loss")
    ])  # fmt: skip
    progress = httpx.get(f"{b.url}/api/v1/runs/{run_id}/detection", params={"wait": 30}, timeout=TIMEOUT_S).json()
    assert progress["through_step"] == 400, progress  # every point examined
    stages = httpx.get(f"{b.url}/api/v1/runs/{run_id}/stages", timeout=TIMEOUT_S).json()
    assert [s["index"] for s in stages] == list(range(len(stages)))  # each stage once
    counted = sum(s["summary"].get("count", 0) for s in stages)
    assert counted == len(losses), stages  # each point counted once in the stage summaries
