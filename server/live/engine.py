"""The threads that run live detection, off the request path.

Every commit that changes a run (ingest, a decision's transition, a run update) calls
:meth:`LiveDetection.notify` through the app's after-commit hook (``server.store.changes``); a thread then runs
a pass (:func:`server.live.detection.process_run`) for each run that has news, each pass in its own write
transaction. With several threads (``threads``; PostgreSQL, where passes of different runs can write at once)
busy runs do not queue behind one another; a run is never passed by two threads at once, and across server
processes its passes take turns under an advisory lock (``server.replicas``). What a pass commits wakes the
worker's long-poll and the live-event streams through the same hook (and queues no further pass).

A run streaming many small batches gets at most one pass every ``min_interval_s`` (10 ms): one pass takes every
point that arrived meanwhile, instead of one write transaction per batch competing with the ingest it follows
(with a client sending one point per request, a pass each cost ~40 % of the request's time). A run that was
quiet for that long still gets its pass at once, so a worker's usual batch a second waits for nothing.

Every ``sweep_s`` the first thread also approves proposals whose run's ``auto_approve_after_s`` has passed. A run
whose approval fails is tried again after a growing pause (``sweep_s`` doubling up to ``APPROVAL_RETRY_MAX_S``) and
its traceback logged once, not twice a second for as long as the fault lasts. At start the threads queue every run
with a detector, so a restarted server catches up on points it has not processed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.live.detection import process_run
from server.models import Run, utcnow
from server.replicas import PASS_LOCK
from server.store import changes, decisions

logger = logging.getLogger("stagewatch.live")

APPROVAL_RETRY_MAX_S = 60.0


class LiveDetection:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        sweep_s: float = 0.5,
        min_interval_s: float = 0.01,
        threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._sessions = sessions
        self._sweep_s = sweep_s
        self._min_interval_s = min_interval_s
        self._dirty: dict[int, None] = {}  # insertion-ordered set
        self._passed_at: dict[int, float] = {}  # run -> monotonic start of its last pass, within min_interval_s
        self._running: set[int] = set()  # runs a thread is passing now: no second thread takes them meanwhile
        self._cond = threading.Condition()
        self._busy = 0  # threads at work
        self._stop = False
        self._clock = clock  # only for the approval retries' pauses (tests step it)
        self._approval_retry: dict[int, tuple[float, float]] = {}  # run -> (not before, pause), after a failure
        # Thread 0 also runs the auto-approval sweep.
        self._threads = [
            threading.Thread(target=self._main, args=(i == 0,), name=f"stagewatch-live-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        with transaction(self._sessions) as session:
            runs = session.scalars(select(Run.id).where(Run.detector.is_not(None)).order_by(Run.id)).all()
        with self._cond:
            self._dirty.update(dict.fromkeys(runs))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def notify(self, run_id: int) -> None:
        """Thread-safe; cheap. The run gets a pass soon (several notifications make one pass)."""
        with self._cond:
            if run_id in self._dirty:
                # Queued already, and its adder woke the threads: they count it in when they sleep. Waking them
                # again for every small batch of a busy run cost each ingest a thread switch (GIL handover).
                return
            self._dirty[run_id] = None
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until nothing is queued or running (tests and benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._dirty or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _main(self, sweeper: bool) -> None:
        next_sweep = time.monotonic() if sweeper else math.inf
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    now = time.monotonic()
                    run_id, ready_at = self._next_due(now)
                    if run_id is not None or now >= next_sweep:
                        break
                    wake_at = min(next_sweep, ready_at)
                    self._cond.wait(None if wake_at == math.inf else max(0.0, wake_at - now))
                if run_id is not None:
                    del self._dirty[run_id]
                    self._passed_at[run_id] = now
                    self._running.add(run_id)
                self._busy += 1
            try:
                if run_id is not None:
                    self._isolated(self._pass, run_id)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_s
                    self._sweep()
            except Exception:  # the sweep's read: the database is away; try again at the next one
                logger.exception("the auto-approval sweep failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    if run_id is not None:
                        self._running.discard(run_id)
                    self._cond.notify_all()

    def _next_due(self, now: float) -> tuple[int | None, float]:
        """The first queued run that no thread is passing and whose last pass began at least ``min_interval_s``
        ago, or None and the moment the next one will be (inf: when a running pass ends, which notifies).
        Called with ``_cond`` held."""
        for run_id, began in list(self._passed_at.items()):
            if now - began >= self._min_interval_s and run_id not in self._running:
                del self._passed_at[run_id]  # forgotten once the interval is over: the map stays small
        ready_at = math.inf
        for run_id in self._dirty:
            if run_id in self._running:
                continue
            last = self._passed_at.get(run_id)
            if last is None:
                return run_id, now
            ready_at = min(ready_at, last + self._min_interval_s)
        return None, ready_at

    def _pass(self, run_id: int) -> None:
        # Not durable on Postgres: a pass lost in a crash is redone identically from the stored points, and the
        # worker only sees a command after the (durable) commit of its delivery.
        with transaction(self._sessions, write=True, durable=False) as session:
            session.info[changes.DETECTING] = True
            if session.get_bind().dialect.name == "postgresql":
                # Passes of one run take turns across server processes (server.replicas): the second waits, then
                # reads what the first committed. Released with the transaction, also when the process dies.
                session.execute(text("SELECT pg_advisory_xact_lock(:space, :run)"), {"space": PASS_LOCK, "run": run_id})
            process_run(session, run_id)

    def _sweep(self) -> None:
        with transaction(self._sessions) as session:  # read-only first: most sweeps find nothing
            due = {run.id for _, run in decisions.due_for_auto_approval(session, utcnow())}
        now = self._clock()
        for run_id in [r for r in self._approval_retry if r not in due]:
            del self._approval_retry[run_id]  # decided or gone meanwhile: the map holds only failing runs
        for run_id in sorted(due):
            not_before, pause = self._approval_retry.get(run_id, (0.0, 0.0))
            if now < not_before:
                continue
            try:
                self._approve_due(run_id)
            except Exception:
                pause = min(max(2 * pause, 2 * self._sweep_s), APPROVAL_RETRY_MAX_S)
                self._approval_retry[run_id] = (now + pause, pause)
                if pause == min(2 * self._sweep_s, APPROVAL_RETRY_MAX_S):
                    logger.exception("auto-approval failed on run %s; trying again in %g s", run_id, pause)
                else:
                    logger.warning("auto-approval failed again on run %s; trying again in %g s", run_id, pause)
            else:
                self._approval_retry.pop(run_id, None)

    @staticmethod
    def _isolated(work: Callable[[int], None], run_id: int) -> None:
        """A failure on one run (a bug, a row that cannot be handled) must not stop detection or
        auto-approval for the others: it is logged, and the run is tried again at its next wake-up."""
        try:
            work(run_id)
        except Exception:
            logger.exception("live detection failed on run %s", run_id)

    def _approve_due(self, run_id: int) -> None:
        with transaction(self._sessions, write=True) as session:
            session.info[changes.DETECTING] = True
            run = session.scalar(select(Run).where(Run.id == run_id).with_for_update())  # run row first
            for decision, run in decisions.due_for_auto_approval(session, utcnow(), run_id=run_id):
                after = f"no decision within {run.auto_approve_after_s:g} s"
                decisions.transition(session, decision, "approved", actor="auto-approve", note=after)
