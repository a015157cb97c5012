"""Series queries: raw points when they fit, otherwise min/max downsampling that keeps every spike.

The requested step range is cut into ``B = (max_points - 1) // 2`` equal buckets. Each bucket contributes its
minimum and its maximum point (its first NaN takes the minimum's place: a diverging loss must show), in step
order, and the last point of the range is always kept, so at most ``max_points`` points come back. The
extremes are read from ``metric_rollups`` (see ``server.store.rollups``) plus the raw points at both ends of the
range, never from a full scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
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
    if not raw.more_than(session, series.id, min_step, max_step, max_points):
        rows = raw.points_in_range(session, series.id, min_step, max_step, limit=max_points + 1)
        if len(rows) <= max_points:  # else points arrived since the probe (a read that is no snapshot)
            return _out(series.key, rows, len(rows), downsampled=False)
    bounds = raw.step_bounds(session, series.id, min_step, max_step)
    assert bounds is not None  # there are points in range: `head` is not empty
    extremes = _Extremes(*bounds, n_buckets=max(1, (max_points - 1) // 2))
    extremes.collect(session, series.id)
    representatives, total = extremes.summarize()
    chosen = sorted(representatives | {bounds[1]})
    return _out(series.key, raw.points_at(session, series.id, chosen), total, downsampled=True)


RollupRow = tuple[int, int | None, int | None, float | None, int | None, float | None]
_ROLLUP = pa.struct(
    [
        ("count", pa.int64()),
        ("nan_step", pa.int64()),
        ("min_step", pa.int64()),
        ("min_value", pa.float64()),
        ("max_step", pa.int64()),
        ("max_value", pa.float64()),
    ]
)


class _Extremes:
    """Per output bucket: its minimum and maximum point and its first NaN, from rollup rows ``(count, nan_step,
    min_step, min_value, max_step, max_value)`` (a raw point is a row of one). Ties go to the earlier step, as in
    the rollups. Computed column-wise (numpy): thousands of rows per chart, where a Python loop over them was
    two thirds of a chart request's time."""

    def __init__(self, lo: int, hi: int, *, n_buckets: int) -> None:
        self.lo, self.hi, self.n = lo, hi, n_buckets
        self.width = (hi - lo + 1) / n_buckets
        self.rows: list[RollupRow] = []

    def add_raw(self, session: Session, series_id: int, lo: int, hi: int) -> None:
        if lo > hi:
            return
        self.rows.extend(
            (1, step, None, None, None, None) if value is None else (1, None, step, value, step, value)
            for step, value, _epoch, _time in raw.points_in_range(session, series_id, lo, hi)
        )

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
        self.rows.extend(read_level_rows(session, series_id, level, first_full, last_full))
        self.add_raw(session, series_id, (last_full + 1) << shift, self.hi)

    def _bucket(self, steps: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.minimum(self.n - 1, ((steps - self.lo) / self.width).astype(np.int64))

    def _first_per_bucket(self, steps: pa.ChunkedArray, order_by: pa.ChunkedArray | None) -> npt.NDArray[np.int64]:
        """Per bucket, the step of the row that sorts first by ``(order_by, step)`` (-1: none)."""
        valid = pc.is_valid(steps)
        step = pc.filter(steps, valid).to_numpy()
        bucket = self._bucket(step)
        keys = (step, pc.filter(order_by, valid).to_numpy(), bucket) if order_by is not None else (step, bucket)
        order = np.lexsort(keys)
        bucket, step = bucket[order], step[order]
        first = np.ones(len(bucket), dtype=bool)
        first[1:] = bucket[1:] != bucket[:-1]
        chosen = np.full(self.n, -1, dtype=np.int64)
        chosen[bucket[first]] = step[first]
        return chosen

    def summarize(self) -> tuple[set[int], int]:
        """The steps to show -- per bucket its first NaN, else its minimum; and its maximum -- and how many
        points the range holds."""
        if not self.rows:
            return set(), 0
        table = pa.Table.from_struct_array(pa.array(self.rows, type=_ROLLUP))
        total = int(pc.sum(table.column("count")).as_py())
        nan = self._first_per_bucket(table.column("nan_step"), None)
        low = self._first_per_bucket(table.column("min_step"), table.column("min_value"))
        high = self._first_per_bucket(table.column("max_step"), pc.negate(table.column("max_value")))
        steps = np.concatenate([np.where(nan >= 0, nan, low), high])
        return {int(s) for s in steps[steps >= 0]}, total


def _coarsest_level(bucket_width: float) -> int | None:
    """The coarsest rollup level at least twice finer than the output buckets, or None for raw points."""
    best = None
    for level, shift in enumerate(SHIFTS):
        if (1 << shift) * 2 <= bucket_width:
            best = level
    return best
