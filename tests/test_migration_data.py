"""A downgrade keeps the data of the tables it does not drop, on both engines.

SQLite cannot drop a column in place, so Alembic's batch mode rebuilds the table (create a copy, drop the
original, rename). Dropping ``runs`` with foreign keys on deleted every child row through ``ON DELETE CASCADE``:
a downgrade from 0003 to 0002 lost every run's tags, points and decisions. This walks down one revision at a
time from head to the first one and counts the child rows after each step.
"""

from __future__ import annotations

from sqlalchemy import Engine, inspect, text

from server.db import make_session_factory, transaction
from server.migrate import downgrade, upgrade
from server.schemas import PointIn, RunCreate
from server.store import decisions as decision_store
from server.store.metrics import ingest_points
from server.store.runs import create_run
from tests.test_migrations import revisions_base_to_head

# Tables of the first revision that hold a run's data; they exist at every revision.
CHILD_TABLES = ("run_tags", "series", "metric_points", "decisions")


def row_counts(engine: Engine) -> dict[str, int]:
    present = set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        return {
            table: int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("runs", *CHILD_TABLES)
            if table in present
        }


def fill(engine: Engine) -> None:
    """Two runs, each with tags, two series of points and a decision, through the store as the server writes."""
    factory = make_session_factory(engine)
    for name in ("a", "b"):
        with transaction(factory, write=True) as session:
            run = create_run(session, RunCreate(name=name, tags=["x", "y"]), actor="test")
            points = [PointIn(key=key, step=step, value=float(step)) for key in ("loss", "lr") for step in range(5)]
            ingest_points(session, run.id, points)
            decision_store.create(
                session,
                run,
                action="decay",
                factor=0.1,
                lr=None,
                step=4,
                source="test",
                actor="test",
                evidence={},
                status="proposed",
            )


def test_downgrade_keeps_every_child_row(db_url: str, engine: Engine) -> None:
    upgrade(db_url)
    fill(engine)
    before = row_counts(engine)
    assert before == {"runs": 2, "run_tags": 4, "series": 4, "metric_points": 20, "decisions": 2}
    for revision in reversed(revisions_base_to_head(db_url)[:-1]):
        downgrade(db_url, revision)
        assert row_counts(engine) == before, f"rows lost by the downgrade to {revision}"
    with engine.connect() as connection:
        names = connection.execute(text("SELECT name FROM runs ORDER BY name")).scalars().all()
    assert names == ["a", "b"]
