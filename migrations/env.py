"""Alembic environment: the URL comes from ``server.migrate.alembic_config``, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from server.db import make_engine
from server.models import Base, schema_compare_filter

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                _foreign_keys(connection, on=False)
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
                render_as_batch=True,
                compare_type=True,
                include_object=schema_compare_filter(connection.dialect.name),
            )
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    _refuse_dangling_references(connection)
    finally:
        engine.dispose()


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    """SQLite: batch mode rebuilds a table by copy, drop and rename; with foreign keys on, dropping ``runs``
    would delete every child row through ``ON DELETE CASCADE``. The pragma is ignored inside a transaction,
    so it goes to the driver's connection before Alembic begins one (the engine is disposed afterwards, so the
    setting never reaches a pooled connection the server uses)."""
    dbapi = connection.connection.driver_connection
    assert dbapi is not None
    dbapi.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _refuse_dangling_references(connection: Connection) -> None:
    """With the checks off, nothing stopped a migration from leaving a reference to a missing row; refuse
    (and so roll back) one that did."""
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if dangling:
        raise RuntimeError(f"the migration left rows that reference missing rows: {dangling[:5]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
