"""Engines and sessions: SQLite tuned for one writer and many readers, Postgres through psycopg 3."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Execution option asking a SQLite transaction to take the write lock up front (BEGIN IMMEDIATE). A deferred
# transaction that reads and then writes can fail with SQLITE_BUSY_SNAPSHOT when another writer committed in
# between, and the busy timeout cannot retry that; taking the lock first turns the race into a short wait.
WRITE_OPTION = "stagewatch_write"

# One writer at a time per SQLite engine, queued in the process: SQLite lets one transaction write, and a
# BEGIN IMMEDIATE that finds the lock taken waits in SQLite's busy handler, which *sleeps* 1, 2, 5, 10 ... up to
# 100 ms between retries: with dozens of concurrent ingests, unlucky ones slept hundreds of ms while the lock was
# free most of the time (p99 0.7 s at 100 workers). Waiting on this lock instead wakes the next writer as soon as
# the previous one commits. The busy timeout still covers writers in other processes (the CLI, another server).
# Re-entrant, so that a nested write transaction in one thread behaves as before (SQLite's own lock decides).
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


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
    # As many connections as requests can use at once: FastAPI runs each blocking call (the token lookup, the
    # ingest) in a thread pool of 40 threads. With SQLAlchemy's default of 5 (+10 overflow), 100 workers sending a
    # batch a second spent most of their time queued for a connection while Postgres sat idle, waiting for a commit's
    # WAL flush. Twenty stay open; twenty more open in a burst. (SQLite keeps the default: its writers queue on
    # _SQLITE_WRITERS before taking a connection, and its reads hold one for microseconds.)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _make_sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
    _SQLITE_WRITERS[engine] = threading.RLock()

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
        # Straight to the driver: SQLAlchemy's execution path (context, cursor wrapper, result) for a statement
        # that returns nothing cost a one-point ingest ~5 % of its CPU.
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

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
    with _writer_turn(factory, write), factory() as session, session.begin():
        # Must be the first use of the session: the options apply when the connection is procured.
        if write:
            session.connection(execution_options={WRITE_OPTION: True})
        elif snapshot and session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        if not durable and session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL synchronous_commit = off"))
        yield session


def _writer_turn(factory: sessionmaker[Session], write: bool) -> AbstractContextManager[Any]:
    """This process's turn to write to a SQLite engine (see ``_SQLITE_WRITERS``); taken before a pooled
    connection is, so that queued writers hold none. Nothing to take for reads or on Postgres."""
    bind = factory.kw.get("bind")
    lock = _SQLITE_WRITERS.get(bind) if write and isinstance(bind, Engine) else None
    return lock if lock is not None else nullcontext()
