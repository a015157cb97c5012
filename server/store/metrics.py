"""Metric ingestion (idempotent, all or nothing) and rewinds after a resume from a checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.errors import Conflict, Invalid
from server.models import MetricPoint, Run, Series
from server.schemas import IngestResult, PointIn, encode_stored_value
from server.store import rollups
from server.store.events import record_event
from server.store.runs import heartbeat

# Rows per "step IN (...)" lookup: well under SQLite's bound-parameter limit.
LOOKUP_CHUNK = 500


@dataclass
class _KeyBatch:
    """The points of one key within a batch, deduplicated, with where each came from in the request."""

    key: str
    rows: dict[int, tuple[float | None, float | None, float]] = field(default_factory=dict)
    index: dict[int, int] = field(default_factory=dict)


def _stored(value: float) -> float | None:
    return None if math.isnan(value) else value


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is None and b is None)


def _group(points: Sequence[PointIn], now: float) -> dict[str, _KeyBatch]:
    groups: dict[str, _KeyBatch] = {}
    for i, p in enumerate(points):
        key = p["key"]
        group = groups.get(key)
        if group is None:
            group = groups[key] = _KeyBatch(key)
        step = p["step"]
        value = _stored(p["value"])
        epoch = p.get("epoch")
        row = (value, None if epoch is None or math.isnan(epoch) else epoch, p.get("time") or now)
        previous = group.rows.get(step)
        if previous is not None:
            if not _same(previous[0], value):
                first = group.index[step]
                raise Invalid(
                    f"points[{i}]: key {key!r} step {step} appears twice in the batch with different values "
                    f"(points[{first}] has {encode_stored_value(previous[0])}, this one {encode_stored_value(value)})"
                )
            continue
        group.rows[step] = row
        group.index[step] = i
    return groups


def _series_for(session: Session, run_id: int, keys: Sequence[str]) -> dict[str, Series]:
    existing = {s.key: s for s in session.scalars(select(Series).where(Series.run_id == run_id, Series.key.in_(keys)))}
    for key in keys:
        if key not in existing:
            existing[key] = Series(run_id=run_id, key=key, point_count=0)
            session.add(existing[key])
    session.flush()
    return existing


def _stored_values(session: Session, series_id: int, steps: Sequence[int]) -> dict[int, float | None]:
    found: dict[int, float | None] = {}
    for i in range(0, len(steps), LOOKUP_CHUNK):
        chunk = steps[i : i + LOOKUP_CHUNK]
        query = select(MetricPoint.step, MetricPoint.value).where(
            MetricPoint.series_id == series_id, MetricPoint.step.in_(chunk)
        )
        found.update((int(step), value) for step, value in session.execute(query))
    return found


def ingest(session: Session, run: Run, points: Sequence[PointIn]) -> IngestResult:
    """Store a batch. Identical resends are counted as duplicates; a changed value is a 409 and the whole
    batch is rejected, so a failed request changes nothing."""
    now = time.time()
    groups = _group(points, now)
    series = _series_for(session, run.id, list(groups))
    inserts: list[tuple[Any, ...]] = []
    fresh: list[tuple[Series, list[int]]] = []
    conflicts: list[dict[str, Any]] = []
    duplicates = 0
    for key, group in groups.items():
        s = series[key]
        steps = list(group.rows)
        if s.last_step is not None and min(steps) <= s.last_step:
            stored = _stored_values(session, s.id, steps)
        else:
            stored = {}  # pure append, the common case: nothing to look up
        new_steps = []
        for step in steps:
            if step in stored:
                if _same(stored[step], group.rows[step][0]):
                    duplicates += 1
                else:
                    conflicts.append(
                        {
                            "index": group.index[step],
                            "key": key,
                            "step": step,
                            "stored": encode_stored_value(stored[step]),
                            "sent": encode_stored_value(group.rows[step][0]),
                        }
                    )
                continue
            new_steps.append(step)
            inserts.append((s.id, step, *group.rows[step]))
        fresh.append((s, new_steps))
    if conflicts:
        conflicts.sort(key=lambda c: c["index"])
        c = conflicts[0]
        raise Conflict(
            f"points[{c['index']}]: key {c['key']!r} step {c['step']} is already stored with value {c['stored']}, "
            f"not {c['sent']}; nothing in this batch was stored. Resend points unchanged, or rewind the run "
            "(POST /api/v1/runs/{id}/rewind) to replace them.",
            extra={"conflicts": conflicts[:20]},
        )
    duplicates += len(points) - sum(len(g.rows) for g in groups.values())
    if inserts:
        _bulk_insert(session, inserts)
    for s, new_steps in fresh:
        if not new_steps:
            continue
        rows = groups[s.key].rows
        rollups.add_points(session, s.id, ((step, rows[step][0]) for step in new_steps))
        s.point_count += len(new_steps)
        top = max(new_steps)
        if s.last_step is None or top > s.last_step:
            s.last_step = top
            s.last_value, s.last_epoch, s.last_time = rows[top]
    heartbeat(run)
    return IngestResult(accepted=len(points), inserted=len(inserts), duplicates=duplicates)


def _bulk_insert(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """The hot path: one driver-level executemany, skipping the ORM's per-row bookkeeping."""
    connection = session.connection()
    marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    sql = (
        "INSERT INTO metric_points (series_id, step, value, epoch, time) "
        f"VALUES ({marker}, {marker}, {marker}, {marker}, {marker})"
    )
    connection.exec_driver_sql(sql, rows)


@dataclass
class RewindOutcome:
    event_id: int
    removed: dict[str, int]


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
        kind="metrics.rewound",
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
