"""The audit log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import Event


def record_event(session: Session, *, run_id: int | None, kind: str, actor: str, payload: dict[str, Any]) -> Event:
    event = Event(run_id=run_id, kind=kind, actor=actor, payload=payload)
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session, run_id: int, *, kind: str | None = None, before_id: int | None = None, limit: int = 100
) -> list[Event]:
    """Newest first; ``before_id`` continues a previous page."""
    query = select(Event).where(Event.run_id == run_id)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if before_id is not None:
        query = query.where(Event.id < before_id)
    return list(session.scalars(query.order_by(Event.id.desc()).limit(limit)))


def get_event(session: Session, run_id: int, event_id: int) -> Event | None:
    event = session.get(Event, event_id)
    return event if event is not None and event.run_id == run_id else None
