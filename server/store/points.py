"""Raw access to ``metric_points`` on the hot paths, at driver level, with each engine's fastest form.

Ingest, downsampling and export touch millions of rows; the ORM's per-row bookkeeping would dominate, so
these functions speak SQL to the DB-API cursor directly. The dialect differences live here and nowhere else:
SQLite takes multi-row INSERTs and ``IN`` lists; Postgres takes COPY and joins against an ``unnest``-ed
array, whose plan stays an index lookup even before the table has statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Column
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from server.models import Base

PointRow = tuple[int, float | None, float | None, float]  # step, value (None = NaN), epoch, time

COLUMNS = "series_id, step, value, epoch, time"
# Postgres: COPY from this many rows up; below, one INSERT from unnest-ed arrays, which (unlike COPY) can share a
# pipeline with the other statements of an ingest -- one network round trip where COPY alone takes three.
COPY_MIN_ROWS = 1000
# SQLite binds at most 32,766 parameters per statement; 1,000 rows of 5 stay far below.
INSERT_ROWS_PER_STATEMENT = 1000
IN_LIST_CHUNK = 500


_DRIVER = "stagewatch_driver"


def _driver(session: Session) -> tuple[Any, str]:
    """The DB-API connection under the session's transaction, and the dialect name. Kept for the rest of that
    transaction: ``session.connection()`` costs ~20 us of Python a call, and an ingest asks eight times."""
    transaction = session.get_transaction()
    cached = session.info.get(_DRIVER)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1], cached[2]
    connection = session.connection()
    driver, dialect = connection.connection.driver_connection, connection.dialect.name
    session.info[_DRIVER] = (session.get_transaction(), driver, dialect)
    return driver, dialect


def driver_cursor(session: Session) -> tuple[Any, str]:
    """A DB-API cursor inside the session's transaction, and the driver's parameter marker."""
    driver, dialect = _driver(session)
    return driver.cursor(), "%s" if dialect == "postgresql" else "?"


def driver_execute(session: Session, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One statement on the DB-API cursor of the session's transaction, written with ``?`` markers (turned
    into ``%s`` for Postgres, so the SQL holds no literal ``?`` or ``%``); its rows, if any. The ingest hot path
    sends a dozen small statements per request, and the ORM spends ~0.2 ms of Python on each where the database
    needs ~0.01 ms: see ``server.store.metrics``."""
    cursor, sql = _prepared(session, sql)
    try:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
    finally:
        cursor.close()


def _prepared(session: Session, sql: str) -> tuple[Any, str]:
    """A cursor of the session's transaction, and ``sql`` with the driver's parameter markers."""
    driver, dialect = _driver(session)
    return driver.cursor(), sql.replace("?", "%s") if dialect == "postgresql" else sql


def driver_executemany(session: Session, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``driver_execute`` once per row, in one driver call (SQLite loops in C; psycopg pipelines the rows)."""
    cursor, sql = _prepared(session, sql)
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


def driver_rowcount(session: Session, sql: str, params: Sequence[Any] = ()) -> int:
    """``driver_execute`` for an UPDATE or DELETE: the number of rows it matched."""
    cursor, sql = _prepared(session, sql)
    try:
        cursor.execute(sql, params)
        count: int = cursor.rowcount
        return count
    finally:
        cursor.close()


@lru_cache(maxsize=256)  # per engine (tests build many), column and direction
def _processor(table: str, column: str, dialect: Dialect, *, bind: bool) -> Callable[[Any], Any] | None:
    col: Column[Any] = Base.metadata.tables[table].c[column]
    impl = col.type.dialect_impl(dialect)
    return impl.bind_processor(dialect) if bind else impl.result_processor(dialect, None)


def to_driver(session: Session, table: str, column: str, value: Any) -> Any:
    """``value`` as the ORM would hand it to the driver for ``table.column`` (a JSON document encoded, a UTC
    datetime formatted for SQLite): rows written at driver level read back exactly like the ORM's."""
    process = _processor(table, column, session.get_bind().dialect, bind=True)
    return value if process is None else process(value)


def from_driver(session: Session, table: str, column: str, value: Any) -> Any:
    """A value read at driver level as the ORM would return it (JSON decoded: ``'null'`` is None)."""
    process = _processor(table, column, session.get_bind().dialect, bind=False)
    return value if process is None else process(value)


@contextmanager
def pipelined(session: Session, enabled: bool = True) -> Iterator[None]:
    """On Postgres, send the statements of the block without waiting for each one's result (psycopg's pipeline
    mode): the block costs one network round trip, not one per statement. Only for statements whose results
    nobody reads (INSERT, UPDATE: ``driver_execute`` returns nothing for them); errors surface at the end of the
    block, and roll the transaction back as usual. Nothing to do on SQLite, which has no round trips."""
    driver, dialect = _driver(session)
    if dialect != "postgresql" or not enabled:
        yield
        return
    with driver.pipeline():
        yield


def insert_points(session: Session, rows: Sequence[tuple[int, int, float | None, float | None, float]]) -> None:
    """Insert ``(series_id, step, value, epoch, time)`` rows; the caller has made sure none exists yet."""
    driver, dialect = _driver(session)
    if dialect == "postgresql" and len(rows) < COPY_MIN_ROWS:
        with driver.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO metric_points ({COLUMNS}) SELECT * FROM "
                "unnest(%s::integer[], %s::bigint[], %s::float8[], %s::float8[], %s::float8[])",
                [list(column) for column in zip(*rows, strict=True)],
            )
        return
    if dialect == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY metric_points ({COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    cursor = driver.cursor()
    try:
        for i in range(0, len(rows), INSERT_ROWS_PER_STATEMENT):
            chunk = rows[i : i + INSERT_ROWS_PER_STATEMENT]
            placeholders = ",".join(["(?,?,?,?,?)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO metric_points ({COLUMNS}) VALUES {placeholders}", [x for r in chunk for x in r]
            )
    finally:
        cursor.close()


def _lookup(session: Session, columns: str, series_id: int, steps: Sequence[int]) -> Iterator[tuple[Any, ...]]:
    driver, dialect = _driver(session)
    if dialect == "postgresql":
        with driver.cursor() as cursor:
            cursor.execute(
                f"SELECT {columns} FROM metric_points AS p JOIN unnest(%s::bigint[]) AS wanted(step) "
                "ON p.series_id = %s AND p.step = wanted.step",
                (list(steps), series_id),
            )
            yield from cursor.fetchall()
        return
    cursor = driver.cursor()
    try:
        for i in range(0, len(steps), IN_LIST_CHUNK):
            chunk = steps[i : i + IN_LIST_CHUNK]
            marks = ",".join("?" * len(chunk))
            cursor.execute(
                f"SELECT {columns} FROM metric_points AS p WHERE p.series_id = ? AND p.step IN ({marks})",
                (series_id, *chunk),
            )
            yield from cursor.fetchall()
    finally:
        cursor.close()


def values_at(session: Session, series_id: int, steps: Sequence[int]) -> dict[int, float | None]:
    """The stored value at each of ``steps`` that has a point."""
    return dict(_lookup(session, "p.step, p.value", series_id, steps))


def points_at(session: Session, series_id: int, steps: Sequence[int]) -> list[PointRow]:
    """The stored points at ``steps``, in step order."""
    return sorted(_lookup(session, "p.step, p.value, p.epoch, p.time", series_id, steps))


def points_in_range(session: Session, series_id: int, lo: int, hi: int, *, limit: int | None = None) -> list[PointRow]:
    """Points with ``lo <= step <= hi`` in step order, at most ``limit``."""
    cursor, mark = driver_cursor(session)
    sql = (
        f"SELECT step, value, epoch, time FROM metric_points WHERE series_id = {mark} "
        f"AND step >= {mark} AND step <= {mark} ORDER BY step"
    )
    params: tuple[int, ...] = (series_id, lo, hi)
    if limit is not None:
        sql += f" LIMIT {mark}"
        params += (limit,)
    try:
        cursor.execute(sql, params)
        rows: list[PointRow] = cursor.fetchall()
        return rows
    finally:
        cursor.close()


def more_than(session: Session, series_id: int, lo: int, hi: int, count: int) -> bool:
    """Whether ``[lo, hi]`` holds more than ``count`` points: one index probe past the first ``count`` (no row
    of them becomes a Python object, as reading them to count would)."""
    cursor, mark = driver_cursor(session)
    try:
        cursor.execute(
            f"SELECT 1 FROM metric_points WHERE series_id = {mark} AND step >= {mark} AND step <= {mark} "
            f"ORDER BY step LIMIT 1 OFFSET {mark}",
            (series_id, lo, hi, count),
        )
        return cursor.fetchone() is not None
    finally:
        cursor.close()


def step_bounds(session: Session, series_id: int, lo: int, hi: int) -> tuple[int, int] | None:
    """First and last step in ``[lo, hi]``. Two single-ended index probes: one query asking for min and
    max together makes SQLite scan the whole range."""
    first = points_in_range(session, series_id, lo, hi, limit=1)
    if not first:
        return None
    cursor, mark = driver_cursor(session)
    try:
        cursor.execute(
            f"SELECT step FROM metric_points WHERE series_id = {mark} AND step >= {mark} AND step <= {mark} "
            "ORDER BY step DESC LIMIT 1",
            (series_id, lo, hi),
        )
        (last,) = cursor.fetchone()
    finally:
        cursor.close()
    return first[0][0], int(last)
