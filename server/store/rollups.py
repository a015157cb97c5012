"""Multi-resolution summaries of each series, so that downsampling never scans raw points.

Level ``L`` groups steps into buckets of ``WIDTHS[L]`` consecutive steps (16, 128, ..., 524288; each level 8x
the one below) and keeps, per bucket: the number of points, of NaNs and the first NaN's step, and the step and
value of the minimum and the maximum. A query over N steps rendered into B buckets reads the coarsest level
whose buckets are at most N/(2B) steps wide: a few thousand rows instead of N, with every bucket's extreme
points exact. Merging is commutative, so points arriving out of order just merge into their buckets.

Rollups only ever see points that were newly inserted (duplicates are filtered out before), and a rewind
rebuilds the buckets it cut through (``rebuild_tail``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from operator import lt
from typing import Any, cast

from sqlalchemy import Insert, Table, and_, case, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from server.models import MetricPoint, MetricRollup
from server.store.points import driver_cursor

SHIFTS = (4, 7, 10, 13, 16, 19)
WIDTHS = tuple(1 << s for s in SHIFTS)
FANOUT_SHIFT = 3  # each level's buckets hold 2**3 buckets of the level below


@dataclass(slots=True)
class Summary:
    count: int = 0
    nan_count: int = 0
    nan_step: int | None = None
    min_step: int | None = None
    min_value: float | None = None
    max_step: int | None = None
    max_value: float | None = None

    def add_point(self, step: int, value: float | None) -> None:
        self.count += 1
        if value is None:
            self.nan_count += 1
            if self.nan_step is None or step < self.nan_step:
                self.nan_step = step
            return
        self.merge_min(step, value)
        self.merge_max(step, value)

    # Ties go to the earlier step, so the result does not depend on the order points arrived in.
    def merge_min(self, step: int | None, value: float | None) -> None:
        if value is None or step is None:
            return
        if self.min_value is None or self.min_step is None or (value, step) < (self.min_value, self.min_step):
            self.min_value, self.min_step = value, step

    def merge_max(self, step: int | None, value: float | None) -> None:
        if value is None or step is None:
            return
        if self.max_value is None or self.max_step is None or (-value, step) < (-self.max_value, self.max_step):
            self.max_value, self.max_step = value, step

    def merge(self, other: Summary) -> None:
        self.count += other.count
        self.nan_count += other.nan_count
        if other.nan_step is not None and (self.nan_step is None or other.nan_step < self.nan_step):
            self.nan_step = other.nan_step
        self.merge_min(other.min_step, other.min_value)
        self.merge_max(other.max_step, other.max_value)


def _sorted_by_step(
    steps: Sequence[int], values: Sequence[float | None]
) -> tuple[Sequence[int], Sequence[float | None]]:
    if all(map(lt, steps, steps[1:])):
        return steps, values
    order = sorted(range(len(steps)), key=steps.__getitem__)
    return [steps[i] for i in order], [values[i] for i in order]


def _base_level(steps: Sequence[int], values: Sequence[float | None]) -> dict[int, Summary]:
    """Level 0, one slice per bucket: builtin min/max over each slice keep this at C speed. ``list.index``
    finds the first occurrence, i.e. the earliest step, as the tie rule wants."""
    steps, values = _sorted_by_step(steps, values)
    shift = SHIFTS[0]
    buckets = [step >> shift for step in steps]
    cuts = [i for i in range(1, len(buckets)) if buckets[i] != buckets[i - 1]]
    out: dict[int, Summary] = {}
    for lo, hi in zip([0, *cuts], [*cuts, len(buckets)], strict=True):
        chunk = values[lo:hi]
        summary = out[buckets[lo]] = Summary()
        if None in chunk:
            for step, value in zip(steps[lo:hi], chunk, strict=True):
                summary.add_point(step, value)
            continue
        finite = cast(list[float], chunk)
        low, high = min(finite), max(finite)
        summary.count = hi - lo
        summary.min_value, summary.min_step = low, steps[lo + finite.index(low)]
        summary.max_value, summary.max_step = high, steps[lo + finite.index(high)]
    return out


def summarise(steps: Sequence[int], values: Sequence[float | None]) -> list[dict[int, Summary]]:
    """Summaries of points (value ``None`` is NaN) at every level, by bucket."""
    levels = [_base_level(steps, values)]
    for _ in SHIFTS[1:]:
        parent: dict[int, Summary] = {}
        for bucket, child in levels[-1].items():
            key = bucket >> FANOUT_SHIFT
            target = parent.get(key)
            if target is None:
                target = parent[key] = Summary()
            target.merge(child)
        levels.append(parent)
    return levels


def _row(series_id: int, level: int, bucket: int, s: Summary) -> dict[str, object]:
    return {
        "series_id": series_id,
        "level": level,
        "bucket": bucket,
        "count": s.count,
        "nan_count": s.nan_count,
        "nan_step": s.nan_step,
        "min_step": s.min_step,
        "min_value": s.min_value,
        "max_step": s.max_step,
        "max_value": s.max_value,
    }


@cache
def _merge_statement(dialect: str) -> Insert:
    table = cast(Table, MetricRollup.__table__)
    stmt = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    new = stmt.excluded
    old = table.c

    def pick(take_new: ColumnElement[bool], column: str) -> ColumnElement[object]:
        return case((take_new, new[column]), else_=old[column])

    take_min = or_null(old.min_value, _better(new.min_value < old.min_value, new, old, "min"), new.min_value)
    take_max = or_null(old.max_value, _better(new.max_value > old.max_value, new, old, "max"), new.max_value)
    take_nan = or_null(old.nan_step, new.nan_step < old.nan_step, new.nan_step)
    return stmt.on_conflict_do_update(
        index_elements=["series_id", "level", "bucket"],
        set_={
            "count": old["count"] + new["count"],
            "nan_count": old.nan_count + new.nan_count,
            "nan_step": pick(take_nan, "nan_step"),
            "min_step": pick(take_min, "min_step"),
            "min_value": pick(take_min, "min_value"),
            "max_step": pick(take_max, "max_step"),
            "max_value": pick(take_max, "max_value"),
        },
    )


def _better(strictly: ColumnElement[bool], new: Any, old: Any, which: str) -> ColumnElement[bool]:
    """Strictly better, or equal at an earlier step (the same tie rule as ``Summary``)."""
    tie: ColumnElement[bool] = (new[f"{which}_value"] == old[f"{which}_value"]) & (
        new[f"{which}_step"] < old[f"{which}_step"]
    )
    return strictly | tie


def or_null(old: ColumnElement[object], better: ColumnElement[bool], new: ColumnElement[object]) -> ColumnElement[bool]:
    """Take the new extreme when the old one is missing, or when the new one exists and is better."""
    return (old.is_(None)) | (new.is_not(None) & better)


def add_points(session: Session, batches: Sequence[tuple[int, Sequence[int], Sequence[float | None]]]) -> None:
    """Merge newly stored points, given as ``(series_id, steps, values)``, into every level."""
    rows = [
        _row(series_id, level, bucket, summary)
        for series_id, steps, values in batches
        for level, summaries in enumerate(summarise(steps, values))
        for bucket, summary in summaries.items()
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect
    sql, order = _merge_sql(dialect)
    cursor, _ = driver_cursor(session)
    try:
        # Straight to the driver: the statement compiled once, a few dozen rows per batch. SQLAlchemy's
        # executemany costs ~1 ms of Python for the parameter processing it does not need here; on Postgres even
        # psycopg's executemany costs ~30 us of Python per row, so all rows go as one array per column.
        if dialect.name == "postgresql":
            cursor.execute(sql, [[row[k] for row in rows] for k in ROLLUP_COLUMNS])
        else:
            cursor.executemany(sql, rows if order is None else [tuple(row[k] for k in order) for row in rows])
    finally:
        cursor.close()


ROLLUP_COLUMNS = (
    "series_id",
    "level",
    "bucket",
    "count",
    "nan_count",
    "nan_step",
    "min_step",
    "min_value",
    "max_step",
    "max_value",
)
_PG_ARRAYS = ("integer", "smallint", "bigint", "bigint", "bigint", "bigint", "bigint", "float8", "bigint", "float8")


@lru_cache(maxsize=16)  # per engine's dialect
def _merge_sql(dialect: Dialect) -> tuple[str, Sequence[str] | None]:
    """``_merge_statement`` as the driver's SQL, and the order of its positional parameters (None: named). On
    Postgres, its rows come from one array per column (``ROLLUP_COLUMNS``), through ``unnest``."""
    compiled = _merge_statement(dialect.name).compile(dialect=dialect)
    if dialect.name != "postgresql":
        return str(compiled), compiled.positiontup
    _, on_conflict = str(compiled).split(" ON CONFLICT ", 1)
    arrays = ", ".join(f"%s::{kind}[]" for kind in _PG_ARRAYS)
    columns = ", ".join(ROLLUP_COLUMNS)
    return f"INSERT INTO metric_rollups ({columns}) SELECT * FROM unnest({arrays}) ON CONFLICT {on_conflict}", None


def rebuild_tail(session: Session, series_id: int, last_step: int) -> None:
    """After every point beyond ``last_step`` was deleted: drop and rebuild the buckets that held them."""
    for level, shift in enumerate(SHIFTS):
        session.execute(
            delete(MetricRollup).where(
                MetricRollup.series_id == series_id,
                MetricRollup.level == level,
                MetricRollup.bucket >= last_step >> shift,
            )
        )
    # Level 0 from the raw points of the cut bucket, each level above from the (intact) level below.
    start = (last_step >> SHIFTS[0]) << SHIFTS[0]
    raw = session.execute(
        select(MetricPoint.step, MetricPoint.value).where(
            MetricPoint.series_id == series_id, MetricPoint.step >= start, MetricPoint.step <= last_step
        )
    )
    summary = Summary()
    for step, value in raw:
        summary.add_point(step, value)
    rebuilt = [(0, last_step >> SHIFTS[0], summary)]
    for level in range(1, len(SHIFTS)):
        bucket = last_step >> SHIFTS[level]
        merged = Summary()
        for child in read_level(
            session, series_id, level - 1, bucket << FANOUT_SHIFT, ((bucket + 1) << FANOUT_SHIFT) - 1
        ):
            merged.merge(child[1])
        if rebuilt[-1][2].count:
            merged.merge(rebuilt[-1][2])
        rebuilt.append((level, bucket, merged))
    rows = [_row(series_id, level, bucket, s) for level, bucket, s in rebuilt if s.count]
    if rows:
        session.execute(insert(MetricRollup), rows)


def read_level(session: Session, series_id: int, level: int, first: int, last: int) -> list[tuple[int, Summary]]:
    """Stored buckets ``first..last`` (inclusive) of one level, in bucket order."""
    r = MetricRollup
    rows = session.execute(
        select(r.bucket, r.count, r.nan_count, r.nan_step, r.min_step, r.min_value, r.max_step, r.max_value)
        .where(and_(r.series_id == series_id, r.level == level, r.bucket >= first, r.bucket <= last))
        .order_by(r.bucket)
    )
    return [(row[0], Summary(*row[1:])) for row in rows]


def read_level_rows(
    session: Session, series_id: int, level: int, first: int, last: int
) -> list[tuple[int, int | None, int | None, float | None, int | None, float | None]]:
    """``read_level`` for the query hot path: plain ``(count, nan_step, min_step, min_value, max_step,
    max_value)`` tuples straight from the driver, thousands of rows per request."""
    cursor, mark = driver_cursor(session)
    try:
        cursor.execute(
            "SELECT count, nan_step, min_step, min_value, max_step, max_value FROM metric_rollups "
            f"WHERE series_id = {mark} AND level = {mark} AND bucket >= {mark} AND bucket <= {mark} ORDER BY bucket",
            (series_id, level, first, last),
        )
        rows: list[tuple[int, int | None, int | None, float | None, int | None, float | None]] = cursor.fetchall()
        return rows
    finally:
        cursor.close()


def rebuild_all(session: Session, series_ids: Sequence[int]) -> None:
    """Recompute every level from the raw points (used after bulk changes and to check consistency)."""
    for series_id in series_ids:
        session.execute(delete(MetricRollup).where(MetricRollup.series_id == series_id))
        rows = session.execute(
            select(MetricPoint.step, MetricPoint.value)
            .where(MetricPoint.series_id == series_id)
            .order_by(MetricPoint.step)
        ).all()
        add_points(session, [(series_id, [int(r[0]) for r in rows], [r[1] for r in rows])])


__all__ = [
    "SHIFTS",
    "WIDTHS",
    "Summary",
    "add_points",
    "read_level",
    "read_level_rows",
    "rebuild_all",
    "rebuild_tail",
    "summarise",
]
