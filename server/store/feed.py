"""The live feed: changes a dashboard must see, in commit order, with their id as the resume cursor."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import FeedEvent, utcnow
from server.store.changes import mark
from server.store.points import driver_execute, to_driver

FEED_KINDS = ("points", "decision", "stage", "run")


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


def read_feed(session: Session, *, after: int, run_id: int | None = None, limit: int = 500) -> list[FeedEvent]:
    """Events with an id above ``after`` (of one run, or of all), oldest first."""
    query = select(FeedEvent).where(FeedEvent.id > after)
    if run_id is not None:
        query = query.where(FeedEvent.run_id == run_id)
    return list(session.scalars(query.order_by(FeedEvent.id).limit(limit)))


def last_feed_id(session: Session) -> int:
    last = session.scalar(select(FeedEvent.id).order_by(FeedEvent.id.desc()).limit(1))
    return int(last) if last is not None else 0
