"""Metric ingestion (idempotent, all or nothing) and rewinds after a resume from a checkpoint."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.errors import Conflict
from server.models import Event, MetricPoint, Run, Series
from server.schemas import IngestResult, PointIn, RewindPublic, encode_stored_value
from server.store import rollups
from server.store.batch import Batch, Column, from_points, same
from server.store.events import record_event
from server.store.feed import insert_feed_event
from server.store.points import (
    COPY_MIN_ROWS,
    IN_LIST_CHUNK,
    driver_execute,
    driver_executemany,
    insert_points,
    pipelined,
    values_at,
)
from server.store.runs import heartbeat


@dataclass(slots=True)
class _SeriesRow:
    """A row of ``series`` as the ingest reads and writes it, at driver level (``server.models.Series``)."""

    id: int
    key: str
    point_count: int
    last_step: int | None
    last_value: float | None
    last_epoch: float | None
    last_time: float | None


SERIES_COLUMNS = "id, key, point_count, last_step, last_value, last_epoch, last_time"


def _series_for(session: Session, run_id: int, keys: Sequence[str]) -> dict[str, _SeriesRow]:
    """The run's series of ``keys``, created where missing. Driver-level SQL: the ORM's select, flush and
    per-object bookkeeping cost more than the rest of a small batch's ingest (see ``points.driver_execute``)."""
    existing: dict[str, _SeriesRow] = {}
    for i in range(0, len(keys), IN_LIST_CHUNK):
        chunk = keys[i : i + IN_LIST_CHUNK]
        rows = driver_execute(
            session,
            f"SELECT {SERIES_COLUMNS} FROM series WHERE run_id = ? AND key IN ({','.join('?' * len(chunk))})",
            (run_id, *chunk),
        )
        existing.update((row[1], _SeriesRow(*row)) for row in rows)
    for key in keys:
        if key not in existing:
            ((series_id,),) = driver_execute(
                session, "INSERT INTO series (run_id, key, point_count) VALUES (?, ?, 0) RETURNING id", (run_id, key)
            )
            existing[key] = _SeriesRow(series_id, key, 0, None, None, None, None)
    return existing


def _save_series(session: Session, rows: Sequence[_SeriesRow]) -> None:
    values = [(s.point_count, s.last_step, s.last_value, s.last_epoch, s.last_time, s.id) for s in rows]
    if session.get_bind().dialect.name == "postgresql":
        # One statement, one array per column: psycopg's executemany costs ~30 us of Python per row.
        driver_execute(
            session,
            "UPDATE series AS s SET point_count = u.point_count, last_step = u.last_step, "
            "last_value = u.last_value, last_epoch = u.last_epoch, last_time = u.last_time "
            "FROM unnest(?::bigint[], ?::bigint[], ?::float8[], ?::float8[], ?::float8[], ?::integer[]) "
            "AS u(point_count, last_step, last_value, last_epoch, last_time, id) WHERE s.id = u.id",
            [list(column) for column in zip(*values, strict=True)],
        )
        return
    driver_executemany(
        session,
        "UPDATE series SET point_count = ?, last_step = ?, last_value = ?, last_epoch = ?, last_time = ? WHERE id = ?",
        values,
    )


def ingest(session: Session, run: Run, points: Sequence[PointIn]) -> IngestResult:
    """Store a batch into ``run`` (loaded with the ORM) and record its heartbeat; see :func:`ingest_batch`."""
    result = ingest_points(session, run.id, points)
    heartbeat(run)
    return result


def ingest_points(session: Session, run_id: int, points: Sequence[PointIn]) -> IngestResult:
    """:func:`ingest_batch` of points in the ``points`` form."""
    return ingest_batch(session, run_id, from_points(points, time.time()))


def ingest_batch(session: Session, run_id: int, batch: Batch) -> IngestResult:
    """Store a batch. Identical resends are counted as duplicates; a changed value is a 409 and the whole
    batch is rejected, so a failed request changes nothing. The caller holds the run's lock
    (:func:`server.store.runs.touch_run` or ``get_run(..., for_update=True)``) and records its heartbeat.

    Runs at driver level, beside the ORM: pending ORM changes are flushed first (the SQL below must see them),
    and ORM objects loaded before are expired afterwards (they must not keep series counts this changed)."""
    session.flush()
    try:
        return _ingest(session, run_id, batch)
    finally:
        if len(session.identity_map):
            session.expire_all()


def _ingest(session: Session, run_id: int, batch: Batch) -> IngestResult:
    columns = batch.columns
    series = _series_for(session, run_id, [c.key for c in columns])
    fresh: list[tuple[_SeriesRow, Column]] = []
    conflicts: list[dict[str, Any]] = []
    for column in columns:
        s = series[column.key]
        if s.last_step is not None and min(column.steps) <= s.last_step:
            new, clashes = _split_stored(session, s.id, column, batch)
            conflicts += clashes
        else:
            new = column  # pure append, the common case: nothing can be stored there yet
        if new.steps:
            fresh.append((s, new))
    if conflicts:
        conflicts.sort(key=itemgetter("index"))
        c = conflicts[0]
        raise Conflict(
            f"{c['where']}: key {c['key']!r} step {c['step']} is already stored with value {c['stored']}, "
            f"not {c['sent']}; nothing in this batch was stored. Resend points unchanged, or rewind the run "
            "(POST /api/v1/runs/{id}/rewind) to replace them.",
            extra={"conflicts": conflicts[:20]},
        )
    inserted = 0
    rows: list[tuple[Any, ...]] = []
    for s, new in fresh:
        rows += zip(repeat(s.id), new.steps, new.values, new.epochs, new.times, strict=False)
        inserted += len(new.steps)
        _advance_latest(s, new)
    if rows:
        # Writes only, nothing read back: on Postgres one round trip for all of them (COPY, for a large batch,
        # cannot be pipelined).
        with pipelined(session, enabled=len(rows) < COPY_MIN_ROWS):
            insert_points(session, rows)
            rollups.add_points(session, [(s.id, new.steps, new.values) for s, new in fresh])
            _save_series(session, [s for s, _ in fresh])
            insert_feed_event(session, run_id, "points", {"keys": {s.key: _feed_summary(new) for s, new in fresh}})
    return IngestResult(accepted=batch.count, inserted=inserted, duplicates=batch.count - inserted)


FEED_POINTS = 64  # a batch this small per key carries its points in the live event: no refetch needed


def _feed_summary(column: Column) -> dict[str, Any]:
    steps = column.steps
    summary: dict[str, Any] = {"count": len(steps), "first_step": min(steps), "last_step": max(steps)}
    if len(steps) <= FEED_POINTS:
        summary["points"] = [
            [step, encode_stored_value(value), epoch, t]
            for step, value, epoch, t in zip(steps, column.values, column.epochs, column.times, strict=True)
        ]
    return summary


def _split_stored(
    session: Session, series_id: int, column: Column, batch: Batch
) -> tuple[Column, list[dict[str, Any]]]:
    """The points of ``column`` not stored yet, and those stored with another value (conflicts)."""
    stored = values_at(session, series_id, column.steps)
    keep = []
    conflicts = []
    for j, step in enumerate(column.steps):
        if step not in stored:
            keep.append(j)
        elif not same(stored[step], column.values[j]):
            conflicts.append(
                {
                    "index": column.index[j],
                    "where": batch.where(column.index[j]),
                    "key": column.key,
                    "step": step,
                    "stored": encode_stored_value(stored[step]),
                    "sent": encode_stored_value(column.values[j]),
                }
            )
    return column.take(keep), conflicts


def _advance_latest(s: _SeriesRow, new: Column) -> None:
    s.point_count += len(new.steps)
    top = max(range(len(new.steps)), key=new.steps.__getitem__)
    if s.last_step is None or new.steps[top] > s.last_step:
        s.last_step = new.steps[top]
        s.last_value, s.last_epoch, s.last_time = new.values[top], new.epochs[top], new.times[top]


@dataclass
class RewindOutcome:
    event_id: int
    removed: dict[str, int]


REWOUND = "metrics.rewound"


def rewind(session: Session, run: Run, step: int, *, reason: str, actor: str) -> RewindOutcome:
    """Move every point after ``step`` into the audit log, so that a run resumed from the checkpoint at
    ``step`` can log those steps again. Nothing is dropped: the event holds the removed points."""
    removed: dict[str, int] = {}
    archived: dict[str, list[list[Any]]] = {}
    for s in session.scalars(select(Series).where(Series.run_id == run.id).order_by(Series.key)):
        if s.last_step is None or s.last_step <= step:
            continue
        rows = session.execute(
            select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch, MetricPoint.time)
            .where(MetricPoint.series_id == s.id, MetricPoint.step > step)
            .order_by(MetricPoint.step)
        ).all()
        archived[s.key] = [[st, encode_stored_value(v), epoch, t] for st, v, epoch, t in rows]
        removed[s.key] = len(rows)
        session.execute(delete(MetricPoint).where(MetricPoint.series_id == s.id, MetricPoint.step > step))
        rollups.rebuild_tail(session, s.id, step)
        _refresh_latest(session, s, len(rows))
    event = record_event(
        session,
        run_id=run.id,
        kind=REWOUND,
        actor=actor,
        payload={
            "step": step,
            "reason": reason,
            "removed": removed,
            "columns": ["step", "value", "epoch", "time"],
            "points": archived,
        },
    )
    heartbeat(run)
    return RewindOutcome(event_id=event.id, removed=removed)


def list_rewinds(session: Session, run_id: int, *, after: int = 0) -> list[RewindPublic]:
    """The run's rewinds with an event id above ``after``, oldest first. Only the summary is read out of each
    event's payload: the archived points it also holds can be millions."""
    payload = Event.payload
    rows = session.execute(
        select(Event.id, Event.created_at, Event.actor, payload["step"], payload["reason"], payload["removed"])
        .where(Event.run_id == run_id, Event.kind == REWOUND, Event.id > after)
        .order_by(Event.id)
    )
    return [
        RewindPublic(event_id=id_, step=step, time=at, actor=actor, reason=reason or "", removed=removed or {})
        for id_, at, actor, step, reason, removed in rows
    ]


def _refresh_latest(session: Session, s: Series, removed: int) -> None:
    s.point_count -= removed
    last = session.execute(
        select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch, MetricPoint.time)
        .where(MetricPoint.series_id == s.id)
        .order_by(MetricPoint.step.desc())
        .limit(1)
    ).first()
    if last is None:
        s.last_step = s.last_value = s.last_epoch = s.last_time = None
    else:
        s.last_step, s.last_value, s.last_epoch, s.last_time = last


def count_points(session: Session, series_id: int) -> int:
    return session.scalar(select(func.count()).where(MetricPoint.series_id == series_id)) or 0
