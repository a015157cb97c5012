"""Schema migrations (Alembic, scripts in ``migrations/``) and the start-up schema check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from server.db import make_engine, normalise_url


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code needs."""


class UnknownRevision(SchemaOutOfDate):
    """The database is at a revision this code does not know (written by a newer version?): never upgrade it."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # ConfigParser interpolation would choke on '%' in passwords.
    config.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return config


def head_revision(database_url: str = "sqlite://") -> str:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def upgrade_command(database_url: str) -> str:
    return f"stagewatch db upgrade --db '{database_url}'"


def check_schema(engine: Engine, database_url: str) -> str:
    """Returns the current revision, or raises with the exact command that brings the schema up to date."""
    current = current_revision(engine)
    head = head_revision(database_url)
    if current == head:
        return current
    if current is None:
        problem = "has no Stagewatch schema yet"
    elif current in {
        rev.revision for rev in ScriptDirectory.from_config(alembic_config(database_url)).walk_revisions()
    }:
        problem = f"is at schema revision {current}, this version needs {head}"
    else:
        raise UnknownRevision(
            f"the database is at revision {current}, which this version of Stagewatch does not know "
            "(was it written by a newer version?); refusing to start"
        )
    raise SchemaOutOfDate(f"the database {problem}. Run:\n\n    {upgrade_command(database_url)}\n")


def ensure_schema(database_url: str, *, auto_upgrade: bool) -> str:
    engine = make_engine(database_url)
    try:
        try:
            return check_schema(engine, database_url)
        except SchemaOutOfDate as exc:
            if not auto_upgrade or isinstance(exc, UnknownRevision):
                raise
        upgrade(database_url)
        return check_schema(engine, database_url)
    finally:
        engine.dispose()
