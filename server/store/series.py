"""Series queries: raw points when they fit, otherwise min/max downsampling that keeps every spike.

The requested step range is cut into ``B = (max_points - 1) // 2`` equal buckets. Each bucket contributes its
minimum and its maximum point (its first NaN takes the minimum's place: a diverging loss must show), in step
order, and the last point of the range is always kept, so at most ``max_points`` points come back. The
extremes are read from ``metric_rollups`` (see ``server.store.rollups``) plus the raw points at both ends of the
range, never from a full scan.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import Series
from server.schemas import SeriesOut, encode_stored_value, encode_value
from server.store import points as raw
from server.store.points import PointRow
from server.store.rollups import SHIFTS, read_level_rows


def series_of(session: Session, run_id: int, keys: Sequence[str] | None) -> list[Series]:
    query = select(Series).where(Series.run_id == run_id)
    if keys:
        query = query.where(Series.key.in_(keys))
    return list(session.scalars(query.order_by(Series.key)))


def _out(key: str, rows: Sequence[PointRow], total: int, downsampled: bool) -> SeriesOut:
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
    head = raw.points_in_range(session, series.id, min_step, max_step, limit=max_points + 1)
    if len(head) <= max_points:
        return _out(series.key, head, len(head), downsampled=False)
    bounds = raw.step_bounds(session, series.id, min_step, max_step)
    assert bounds is not None  # there are points in range: `head` is not empty
    extremes = _Extremes(*bounds, n_buckets=max(1, (max_points - 1) // 2))
    extremes.collect(session, series.id)
    chosen = sorted(extremes.representatives() | {bounds[1]})
    return _out(series.key, raw.points_at(session, series.id, chosen), extremes.total, downsampled=True)


class _Extremes:
    """Per output bucket: the (value, step) of its minimum and maximum, and its first NaN step. Ties go to
    the earlier step, as in the rollups."""

    def __init__(self, lo: int, hi: int, *, n_buckets: int) -> None:
        self.lo, self.hi, self.n = lo, hi, n_buckets
        self.width = (hi - lo + 1) / n_buckets
        self.low: list[tuple[float, int] | None] = [None] * n_buckets
        self.high: list[tuple[float, int] | None] = [None] * n_buckets  # stored as (-value, step)
        self.nan: list[int | None] = [None] * n_buckets
        self.total = 0

    def _index(self, step: int) -> int:
        return min(self.n - 1, int((step - self.lo) / self.width))

    def add(
        self,
        min_step: int | None,
        min_value: float | None,
        max_step: int | None,
        max_value: float | None,
        nan_step: int | None,
    ) -> None:
        if min_step is not None and min_value is not None:
            i = self._index(min_step)
            current = self.low[i]
            if current is None or (min_value, min_step) < current:
                self.low[i] = (min_value, min_step)
        if max_step is not None and max_value is not None:
            i = self._index(max_step)
            current = self.high[i]
            if current is None or (-max_value, max_step) < current:
                self.high[i] = (-max_value, max_step)
        if nan_step is not None:
            i = self._index(nan_step)
            current_nan = self.nan[i]
            if current_nan is None or nan_step < current_nan:
                self.nan[i] = nan_step

    def add_raw(self, session: Session, series_id: int, lo: int, hi: int) -> None:
        if lo > hi:
            return
        for step, value, _epoch, _time in raw.points_in_range(session, series_id, lo, hi):
            self.total += 1
            if value is None:
                self.add(None, None, None, None, step)
            else:
                self.add(step, value, step, value, None)

    def collect(self, session: Session, series_id: int) -> None:
        """Raw points at both ends, rollup rows of the coarsest fitting level in between."""
        level = _coarsest_level(self.width)
        if level is None:
            self.add_raw(session, series_id, self.lo, self.hi)
            return
        shift = SHIFTS[level]
        first_full = (self.lo + (1 << shift) - 1) >> shift  # first rollup bucket starting at or after lo
        last_full = ((self.hi + 1) >> shift) - 1  # last rollup bucket ending at or before hi
        if first_full > last_full:
            self.add_raw(session, series_id, self.lo, self.hi)
            return
        self.add_raw(session, series_id, self.lo, (first_full << shift) - 1)
        for count, nan_step, min_step, min_value, max_step, max_value in read_level_rows(
            session, series_id, level, first_full, last_full
        ):
            self.total += count
            self.add(min_step, min_value, max_step, max_value, nan_step)
        self.add_raw(session, series_id, (last_full + 1) << shift, self.hi)

    def representatives(self) -> set[int]:
        steps: set[int] = set()
        for low, high, nan in zip(self.low, self.high, self.nan, strict=True):
            if nan is not None:
                steps.add(nan)
            elif low is not None:
                steps.add(low[1])
            if high is not None:
                steps.add(high[1])
        return steps


def _coarsest_level(bucket_width: float) -> int | None:
    """The coarsest rollup level at least twice finer than the output buckets, or None for raw points."""
    best = None
    for level, shift in enumerate(SHIFTS):
        if (1 << shift) * 2 <= bucket_width:
            best = level
    return best
