"""The live-detection thread's scheduling: a run that streams many small batches gets one pass per interval
covering all of them, a quiet run is never held back by a busy one, and no notification is ever left without
a pass after it. The passes themselves are recorded, not run: what they do is tested in test_live_detection."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from server.db import make_engine, make_session_factory, transaction
from server.live.engine import LiveDetection
from server.models import Decision, utcnow
from server.schemas import RunCreate
from server.store import decisions
from server.store.runs import create_run


class RecordedPasses(LiveDetection):
    def __init__(self, sessions: sessionmaker[Session], *, min_interval_s: float, threads: int = 1) -> None:
        super().__init__(sessions, min_interval_s=min_interval_s, threads=threads)
        self.passes: list[tuple[int, float]] = []  # run, the monotonic time the scheduler started its pass
        self.recorded = threading.Condition()

    def _pass(self, run_id: int) -> None:
        with self.recorded:
            self.passes.append((run_id, self._passed_at[run_id]))
            self.recorded.notify_all()

    def wait_for_pass(self, run_id: int, timeout: float = 30.0) -> None:
        with self.recorded:
            assert self.recorded.wait_for(lambda: any(r == run_id for r, _ in self.passes), timeout), (
                f"run {run_id} never got a pass: {self.passes}"
            )


@pytest.fixture
def sessions(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def test_a_busy_run_waits_its_interval_and_does_not_hold_up_a_quiet_one(sessions: sessionmaker[Session]) -> None:
    live = RecordedPasses(sessions, min_interval_s=3600.0)  # run 1 cannot be due again while this test runs
    live.start()
    try:
        live.notify(1)
        live.wait_for_pass(1)
        live.notify(1)
        live.notify(1)
        live.notify(2)
        live.wait_for_pass(2)
        assert [run for run, _ in live.passes] == [1, 2]
        assert not live.wait_idle(timeout=0.05)  # run 1's two notifications are still queued, as one
    finally:
        live.stop()


def test_every_notification_is_followed_by_a_pass_and_passes_keep_their_distance(
    sessions: sessionmaker[Session],
) -> None:
    interval = 0.2
    live = RecordedPasses(sessions, min_interval_s=interval)
    live.start()
    try:
        notified_at = []
        for _ in range(200):  # a worker sending one point per request, as fast as it can
            notified_at.append(time.monotonic())
            live.notify(7)
        assert live.wait_idle(timeout=30)
    finally:
        live.stop()
    starts = [began for run, began in live.passes if run == 7]
    assert starts[-1] >= notified_at[-1], "the last notification got no pass after it"
    assert len(starts) < len(notified_at)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= interval for gap in gaps), gaps


class HeldPasses(RecordedPasses):
    """Passes of the runs in ``held`` wait until ``release`` is set."""

    def __init__(self, sessions: sessionmaker[Session], *, threads: int, held: set[int]) -> None:
        super().__init__(sessions, min_interval_s=0.0, threads=threads)
        self.held = held
        self.release = threading.Event()

    def _pass(self, run_id: int) -> None:
        super()._pass(run_id)
        if run_id in self.held:
            assert self.release.wait(30), "never released"


def test_with_two_threads_a_held_run_neither_blocks_others_nor_runs_twice(sessions: sessionmaker[Session]) -> None:
    live = HeldPasses(sessions, threads=2, held={1})
    live.start()
    try:
        live.notify(1)
        live.wait_for_pass(1)  # thread A is now inside run 1's pass, held
        live.notify(2)
        live.wait_for_pass(2)  # thread B passed run 2 meanwhile
        live.notify(1)  # queued first...
        live.notify(3)
        live.wait_for_pass(3)  # ...yet thread B took run 3: run 1 is being passed
        assert [run for run, _ in live.passes].count(1) == 1
        live.release.set()
        assert live.wait_idle(timeout=30)
        assert [run for run, _ in live.passes].count(1) == 2  # its second notification got its own pass after
    finally:
        live.release.set()
        live.stop()


def test_a_failing_auto_approval_is_retried_with_growing_pauses_and_logged_once(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A proposal whose approval raises (here: a corrupt history) was retried, traceback and all, at every
    sweep -- twice a second for as long as the fault lasted. The sweeps are called directly, on a clock the test
    steps, so nothing depends on the machine's speed."""
    with transaction(sessions, write=True) as session:
        run = create_run(session, RunCreate(name="poisoned", mode="approve", auto_approve_after_s=1), actor="test")
        proposal = decisions.create(
            session, run, action="decay", factor=0.1, lr=None, step=10, source="operator", actor="test",
            evidence={}, status="proposed",
        )  # fmt: skip
        long_ago = utcnow() - dt.timedelta(hours=1)  # due for auto-approval at once
        session.execute(update(Decision).where(Decision.id == proposal.id).values(history=5, created_at=long_ago))
    now = [100.0]
    live = LiveDetection(sessions, sweep_s=0.5, clock=lambda: now[0])

    def sweep_at(t: float) -> list[logging.LogRecord]:
        now[0] = t
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stagewatch.live"):
            live._sweep()
        return [r for r in caplog.records if r.name == "stagewatch.live"]

    first = sweep_at(100.0)
    assert [(r.levelno, r.exc_info is not None) for r in first] == [(logging.ERROR, True)]
    assert "trying again in 1 s" in first[0].getMessage()
    assert sweep_at(100.5) == []  # within the pause: not tried
    second = sweep_at(101.0)
    assert [(r.levelno, r.exc_info) for r in second] == [(logging.WARNING, None)]
    assert "trying again in 2 s" in second[0].getMessage()
    assert sweep_at(102.9) == []
    with transaction(sessions, write=True) as session:  # the fault is repaired
        session.execute(update(Decision).where(Decision.id == proposal.id).values(history=[]))
    assert sweep_at(103.0) == []
    with transaction(sessions) as session:
        repaired = session.get(Decision, proposal.id)
        assert repaired is not None and repaired.status == "approved"
        assert repaired.history[-1]["actor"] == "auto-approve"
    assert live._approval_retry == {}
