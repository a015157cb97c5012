"""PostgreSQL keeps ``metric_points.series_id -> series.id`` with statement-level triggers (migration 0006), not a
declared foreign key: every guarantee the key gave still holds, including under concurrent transactions.

Each test gets its own database at the head revision; two driver connections play two concurrent clients."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import select

from server.db import make_engine, make_session_factory, transaction
from server.models import Series
from server.schemas import PointIn, RunCreate
from server.store.metrics import ingest_points
from server.store.runs import create_run

pytestmark = pytest.mark.parametrize("migrated_url", ["postgres"], indirect=True)

FK = "fk_metric_points_series_id_series"


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))


@pytest.fixture
def db(migrated_url: str) -> Iterator[tuple[str, int, int]]:
    """The database, a run, and its series ``loss`` holding points at steps 0..2, stored as the server stores."""
    engine = make_engine(migrated_url)
    try:
        with transaction(make_session_factory(engine), write=True) as session:
            run = create_run(session, RunCreate(name="r"), actor="test")
            ingest_points(session, run.id, [PointIn(key="loss", step=step, value=0.5) for step in range(3)])
            run_id = run.id
            series_id = session.scalars(select(Series.id).where(Series.run_id == run_id)).one()
    finally:
        engine.dispose()
    yield migrated_url, run_id, series_id


def insert(conn: psycopg.Connection, series_id: int, steps: range) -> None:
    with conn.cursor() as cur, cur.copy("COPY metric_points (series_id, step, value, epoch, time) FROM STDIN") as copy:
        for step in steps:
            copy.write_row((series_id, step, 0.5, None, 1.7e9))


def count(url: str, series_id: int) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM metric_points WHERE series_id = %s", (series_id,)).fetchone()
        return int(row[0]) if row else -1


def test_no_declared_key_and_the_triggers_in_place(db: tuple[str, int, int]) -> None:
    url, _, _ = db
    with connect(url) as conn:
        keys = conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'metric_points'::regclass AND contype = 'f'"
        ).fetchall()
        triggers = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgrelid IN ('metric_points'::regclass, "
            "'series'::regclass) ORDER BY tgname"
        ).fetchall()
    assert keys == []
    assert [t[0] for t in triggers] == [
        "metric_points_series_on_insert",
        "metric_points_series_on_update",
        "series_delete_points",
        "series_keep_id",
        "series_no_truncate",
    ]


@pytest.mark.parametrize("how", ["copy", "insert", "update"])
def test_a_point_of_no_series_is_refused_and_nothing_of_the_statement_stays(db: tuple[str, int, int], how: str) -> None:
    url, _, series_id = db
    missing = series_id + 1000
    with connect(url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation) as excinfo:
        if how == "copy":  # the ingest's way for large batches: good rows and one bad one in one statement
            with conn.cursor() as cur, cur.copy("COPY metric_points (series_id, step, value, time) FROM STDIN") as cp:
                cp.write_row((series_id, 10, 1.0, 1.7e9))
                cp.write_row((missing, 11, 1.0, 1.7e9))
        elif how == "insert":
            conn.execute(
                "INSERT INTO metric_points (series_id, step, value, time) VALUES (%s, 10, 1.0, 1.7e9), "
                "(%s, 11, 1.0, 1.7e9)",
                (series_id, missing),
            )
        else:
            conn.execute("UPDATE metric_points SET series_id = %s WHERE step = 1", (missing,))
    assert excinfo.value.diag.constraint_name == FK
    assert excinfo.value.diag.message_detail == f'Key (series_id)=({missing}) is not present in table "series".'
    assert count(url, series_id) == 3 and count(url, missing) == 0


def test_deleting_a_series_or_its_run_deletes_the_points(db: tuple[str, int, int]) -> None:
    url, run_id, series_id = db
    with connect(url) as conn:
        (other,) = conn.execute(
            "INSERT INTO series (run_id, key, point_count) VALUES (%s, 'lr', 2) RETURNING id", (run_id,)
        ).fetchone() or (0,)
        insert(conn, other, range(2))
        conn.execute("DELETE FROM series WHERE id = %s", (series_id,))
        conn.commit()
    assert count(url, series_id) == 0 and count(url, other) == 2
    with connect(url) as conn:
        conn.execute("DELETE FROM runs WHERE id = %s", (run_id,))  # runs -> series is a declared cascading key
        conn.commit()
    assert count(url, other) == 0


def test_a_referenced_series_keeps_its_id_and_is_not_truncated_alone(db: tuple[str, int, int]) -> None:
    url, run_id, series_id = db
    with connect(url) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as excinfo:
            conn.execute("UPDATE series SET id = id + 1000 WHERE id = %s", (series_id,))
        assert excinfo.value.diag.constraint_name == FK
        conn.rollback()
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("TRUNCATE series")
        conn.rollback()
        # Without points it may change, and both tables may be truncated together.
        (empty,) = conn.execute(
            "INSERT INTO series (run_id, key, point_count) VALUES (%s, 'empty', 0) RETURNING id", (run_id,)
        ).fetchone() or (0,)
        conn.execute("UPDATE series SET id = %s WHERE id = %s", (empty + 1000, empty))
        conn.execute("TRUNCATE series, metric_points CASCADE")
        conn.commit()
    assert count(url, series_id) == 0


def waiting_on_a_lock(url: str, pid: int) -> bool:
    with connect(url) as conn:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


def wait_until_blocked(url: str, pid: int, worker: threading.Thread) -> None:
    """Returns once the backend ``pid`` waits on a lock (never on the clock: a condition, checked until true)."""
    event = threading.Event()
    while not waiting_on_a_lock(url, pid):
        assert worker.is_alive(), "the second transaction finished without waiting for the first"
        event.wait(0.01)


def blocked_behind(
    url: str, first: psycopg.Connection, second: psycopg.Connection, work: Callable[[], object]
) -> list[type]:
    """Runs ``work`` on ``second`` in a thread, waits until it waits on a lock ``first`` holds, commits ``first``,
    and returns the types of the exceptions ``work`` raised (``[]``: it went through)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
            second.commit()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    wait_until_blocked(url, second.info.backend_pid, worker)
    first.commit()
    worker.join(timeout=60)
    assert not worker.is_alive()
    return [type(e) for e in errors]


def test_a_delete_waits_for_a_transaction_adding_points_and_then_takes_them(db: tuple[str, int, int]) -> None:
    url, _, series_id = db
    with connect(url) as adder, connect(url) as deleter:
        insert(adder, series_id, range(3, 6))  # not committed: the series is locked FOR KEY SHARE
        work = lambda: deleter.execute("DELETE FROM series WHERE id = %s", (series_id,))  # noqa: E731
        assert blocked_behind(url, adder, deleter, work) == []
    assert count(url, series_id) == 0  # no point outlived its series


def test_points_for_a_series_being_deleted_wait_and_are_refused(db: tuple[str, int, int]) -> None:
    url, _, series_id = db
    with connect(url) as adder, connect(url) as deleter:
        deleter.execute("DELETE FROM series WHERE id = %s", (series_id,))  # not committed yet
        errors = blocked_behind(url, deleter, adder, lambda: insert(adder, series_id, range(3, 6)))
        assert errors == [psycopg.errors.ForeignKeyViolation]
    assert count(url, series_id) == 0
