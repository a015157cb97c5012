"""Engines and sessions: SQLite tuned for one writer and many readers, Postgres through psycopg 3."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Execution option asking a SQLite transaction to take the write lock up front (BEGIN IMMEDIATE). A deferred
# transaction that reads and then writes can fail with SQLITE_BUSY_SNAPSHOT when another writer committed in
# between, and the busy timeout cannot retry that; taking the lock first turns the race into a short wait.
WRITE_OPTION = "stagewatch_write"


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and route them to psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return _make_sqlite_engine(url, **kwargs)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _make_sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see the "begin" hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=NORMAL is corruption-safe under WAL; a power cut
        # can lose only the last transactions, never damage the file.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(
    factory: sessionmaker[Session], *, write: bool = False, snapshot: bool = False, durable: bool = True
) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on any error. Store code never commits.

    ``write`` takes SQLite's write lock up front; ``snapshot`` makes every statement see the same data
    (Postgres REPEATABLE READ; a SQLite read transaction in WAL mode is a snapshot already). ``durable=False``
    lets Postgres acknowledge the commit before it reaches the disk (``synchronous_commit = off``): only for
    work that is redone identically if a crash loses it (a detection pass, a delivery mark). SQLite already
    commits without waiting for the disk under WAL with ``synchronous=NORMAL``.
    """
    with factory() as session, session.begin():
        # Must be the first use of the session: the options apply when the connection is procured.
        if write:
            session.connection(execution_options={WRITE_OPTION: True})
        elif snapshot and session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        if not durable and session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL synchronous_commit = off"))
        yield session
