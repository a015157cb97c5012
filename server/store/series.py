"""Series queries: raw points when they fit, otherwise min/max downsampling that keeps every spike.

The requested step range is cut into ``B = (max_points - 1) // 2`` equal buckets. Each bucket contributes its
minimum and its maximum point (its first NaN takes the minimum's place: a diverging loss must show), in step
order, and the last point of the range is always kept, so at most ``max_points`` points come back. The
extremes are read from ``metric_rollups`` (see ``server.store.rollups``) plus the raw points at both ends of the
range, never from a full scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.models import MetricPoint, Series
from server.schemas import SeriesOut, encode_stored_value, encode_value
from server.store import rollups
from server.store.rollups import SHIFTS, Summary

LOOKUP_CHUNK = 500


@dataclass(frozen=True)
class StepRange:
    lo: int
    hi: int


def series_of(session: Session, run_id: int, keys: Sequence[str] | None) -> list[Series]:
    query = select(Series).where(Series.run_id == run_id)
    if keys:
        query = query.where(Series.key.in_(keys))
    return list(session.scalars(query.order_by(Series.key)))


def _raw(
    session: Session, series_id: int, lo: int, hi: int, limit: int | None = None
) -> list[tuple[int, float | None, float | None, float]]:
    query = (
        select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch, MetricPoint.time)
        .where(MetricPoint.series_id == series_id, MetricPoint.step >= lo, MetricPoint.step <= hi)
        .order_by(MetricPoint.step)
    )
    if limit is not None:
        query = query.limit(limit)
    return [tuple(r) for r in session.execute(query)]  # type: ignore[misc]


def _bounds(session: Session, series_id: int, lo: int, hi: int) -> StepRange | None:
    first, last = session.execute(
        select(func.min(MetricPoint.step), func.max(MetricPoint.step)).where(
            MetricPoint.series_id == series_id, MetricPoint.step >= lo, MetricPoint.step <= hi
        )
    ).one()
    return None if first is None else StepRange(int(first), int(last))


def _out(
    key: str, rows: Sequence[tuple[int, float | None, float | None, float]], total: int, downsampled: bool
) -> SeriesOut:
    return SeriesOut(
        key=key,
        steps=[r[0] for r in rows],
        values=[encode_stored_value(r[1]) for r in rows],
        epochs=[encode_value(r[2]) for r in rows],
        times=[r[3] for r in rows],
        total_points=total,
        downsampled=downsampled,
    )


def query_series(session: Session, series: Series, *, min_step: int, max_step: int, max_points: int) -> SeriesOut:
    head = _raw(session, series.id, min_step, max_step, limit=max_points + 1)
    if len(head) <= max_points:
        return _out(series.key, head, len(head), downsampled=False)
    span = _bounds(session, series.id, min_step, max_step)
    assert span is not None  # there are points in range: `head` is not empty
    buckets, total = _bucket_extremes(session, series.id, span, n_buckets=max(1, (max_points - 1) // 2))
    chosen = sorted({step for b in buckets for step in _representatives(b)} | {span.hi})
    rows = _points_at(session, series.id, chosen)
    return _out(series.key, rows, total, downsampled=True)


def _representatives(s: Summary) -> tuple[int, ...]:
    low = s.nan_step if s.nan_step is not None else s.min_step
    return tuple(step for step in (low, s.max_step) if step is not None)


def _bucket_extremes(session: Session, series_id: int, span: StepRange, *, n_buckets: int) -> tuple[list[Summary], int]:
    """Per output bucket, a summary whose min/max/NaN steps are exact points of that bucket."""
    width = (span.hi - span.lo + 1) / n_buckets
    out = [Summary() for _ in range(n_buckets)]

    def index(step: int) -> int:
        return min(n_buckets - 1, int((step - span.lo) / width))

    total = 0

    def add_raw(lo: int, hi: int) -> None:
        nonlocal total
        for step, value, _epoch, _time in _raw(session, series_id, lo, hi):
            out[index(step)].add_point(step, value)
            total += 1

    level = _coarsest_level(width)
    shift = SHIFTS[level] if level is not None else 0
    first_full = (span.lo + (1 << shift) - 1) >> shift  # first rollup bucket starting at or after lo
    last_full = ((span.hi + 1) >> shift) - 1  # last rollup bucket ending at or before hi
    if level is None or first_full > last_full:
        add_raw(span.lo, span.hi)
        return out, total
    add_raw(span.lo, (first_full << shift) - 1)
    for _bucket, s in rollups.read_level(session, series_id, level, first_full, last_full):
        total += s.count
        # Each extreme of a rollup bucket is credited to the output bucket that contains its step.
        if s.min_step is not None:
            out[index(s.min_step)].merge(Summary(min_step=s.min_step, min_value=s.min_value))
        if s.max_step is not None:
            out[index(s.max_step)].merge(Summary(max_step=s.max_step, max_value=s.max_value))
        if s.nan_step is not None:
            out[index(s.nan_step)].merge(Summary(nan_count=1, nan_step=s.nan_step))
    add_raw((last_full + 1) << shift, span.hi)
    return out, total


def _coarsest_level(bucket_width: float) -> int | None:
    """The coarsest rollup level at least twice finer than the output buckets, or None for raw points."""
    best = None
    for level, shift in enumerate(SHIFTS):
        if (1 << shift) * 2 <= bucket_width:
            best = level
    return best


def _points_at(
    session: Session, series_id: int, steps: Sequence[int]
) -> list[tuple[int, float | None, float | None, float]]:
    rows: list[tuple[int, float | None, float | None, float]] = []
    for i in range(0, len(steps), LOOKUP_CHUNK):
        chunk = steps[i : i + LOOKUP_CHUNK]
        query = select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch, MetricPoint.time).where(
            MetricPoint.series_id == series_id, MetricPoint.step.in_(chunk)
        )
        rows.extend(tuple(r) for r in session.execute(query))  # type: ignore[misc]
    rows.sort()
    return rows
