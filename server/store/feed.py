"""The live feed: changes a dashboard must see, in id order, with their id as the resume cursor.

On PostgreSQL, ids come from a sequence when a row is inserted, and concurrent transactions commit in any
order: event 11 may be visible while event 10 is still in flight. A reader that took 11 and moved its cursor
past 10 would never see 10. :class:`FeedCursor` therefore advances only over ids with no gap before them. A
missing id is waited for -- its transaction's commit wakes the streams -- and given up once no transaction that
could hold it is still running: every transaction with an id was already writing when the gap was first seen,
so it is over once the oldest running transaction (the snapshot's ``xmin``) is younger than the youngest one of
then (``xmax``), which happens at once when the transaction rolled back or its server was killed. A gap is also
given up after ``GAP_GRACE_S`` whatever runs. SQLite has one writer at a time and reuses a rolled-back id, so
its ids are visible in order and nothing is held back there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from server.models import FeedEvent, utcnow
from server.store.changes import mark
from server.store.points import driver_execute, to_driver

FEED_KINDS = ("points", "decision", "stage", "run")
GAP_GRACE_S = 60.0  # the longest a missing id is waited for, however long the transactions that may hold it run
GAP_SETTLE_S = 1.0  # the least: a transaction may take its id an instant before it takes its transaction id

logger = logging.getLogger(__name__)


def add_feed_event(session: Session, run_id: int, kind: str, payload: dict[str, Any]) -> None:
    """Appends one event; it becomes visible to subscribers -- and they are woken -- when the transaction commits."""
    session.add(FeedEvent(run_id=run_id, kind=kind, payload=payload))
    mark(session, run_id)


def insert_feed_event(session: Session, run_id: int, kind: str, payload: dict[str, Any]) -> None:
    """``add_feed_event`` at driver level, for the ingest hot path (an ORM insert and its flush cost ~0.5 ms).
    The row is written at once, so its id comes before those of events added later in the transaction, as it
    would through the ORM; column values are encoded exactly as the ORM encodes them."""
    driver_execute(
        session,
        "INSERT INTO feed_events (run_id, kind, payload, created_at) VALUES (?, ?, ?, ?)",
        (
            run_id,
            kind,
            to_driver(session, "feed_events", "payload", payload),
            to_driver(session, "feed_events", "created_at", utcnow()),
        ),
    )
    mark(session, run_id)


def read_feed(
    session: Session, *, after: int, run_id: int | None = None, limit: int = 500, upto: int | None = None
) -> list[FeedEvent]:
    """Events with an id above ``after`` (and at most ``upto``), of one run or of all, oldest first."""
    query = select(FeedEvent).where(FeedEvent.id > after)
    if upto is not None:
        query = query.where(FeedEvent.id <= upto)
    if run_id is not None:
        query = query.where(FeedEvent.run_id == run_id)
    return list(session.scalars(query.order_by(FeedEvent.id).limit(limit)))


class FeedCursor:
    """One stream's place in the feed: :meth:`read` returns the next events (of one run, or of all) and never
    moves past an id that may still appear (see the module's docstring)."""

    def __init__(self, after: int) -> None:
        self.after = after
        # First id of a gap -> (when this cursor first saw it, the snapshot's xmax then).
        self._gaps: dict[int, tuple[float, int]] = {}

    def read(self, session: Session, *, run_id: int | None, limit: int) -> list[FeedEvent]:
        if session.get_bind().dialect.name != "postgresql":
            events = read_feed(session, after=self.after, run_id=run_id, limit=limit)
            if events:
                self.after = events[-1].id
            return events
        horizon = self._horizon(session, limit)
        if horizon == self.after:
            return []
        events = read_feed(session, after=self.after, upto=horizon, run_id=run_id, limit=limit)
        # All ids up to the horizon are settled: past them, also when none of them is this stream's run's.
        self.after = events[-1].id if len(events) == limit else horizon
        return events

    def _horizon(self, session: Session, limit: int) -> int:
        """The last id up to which every id is either visible or given up for good."""
        ids = session.scalars(
            select(FeedEvent.id).where(FeedEvent.id > self.after).order_by(FeedEvent.id).limit(limit)
        ).all()
        now = time.monotonic()
        xmin, xmax = session.execute(
            text(
                "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint "
                "FROM pg_current_snapshot() AS s"
            )
        ).one()
        previous = self.after
        for event_id in ids:  # every gap in sight starts its clock now, not when the ones before it are passed
            if event_id != previous + 1:
                self._gaps.setdefault(previous + 1, (now, xmax))
            previous = event_id
        horizon = self.after
        for event_id in ids:
            if event_id != horizon + 1:
                seen, xmax_then = self._gaps[horizon + 1]
                over = now - seen >= GAP_SETTLE_S and xmin >= xmax_then
                if not over and now - seen < GAP_GRACE_S:
                    break  # in flight, most likely: its commit will wake this stream
                logger.info("live feed ids %d..%d never committed; passed over", horizon + 1, event_id - 1)
            horizon = event_id
        self._gaps = {gap: seen for gap, seen in self._gaps.items() if gap > horizon}
        return horizon


def last_feed_id(session: Session) -> int:
    last = session.scalar(select(FeedEvent.id).order_by(FeedEvent.id.desc()).limit(1))
    return int(last) if last is not None else 0
