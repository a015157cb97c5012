"""Migrations on SQLite and Postgres: upgrade from empty, model/schema agreement, a step-by-step walk down to
base and up again, and the start-up schema check that refuses an out-of-date or unknown schema."""

from __future__ import annotations

import re
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from server.app import create_app
from server.migrate import (
    SchemaOutOfDate,
    alembic_config,
    check_schema,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)
from server.models import Base, schema_compare_filter
from server.settings import Settings


def schema_diff(engine: Engine) -> list[Any]:
    """What autogenerate would change to make the database match the models; ``[]`` when they agree."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_object": schema_compare_filter(connection.dialect.name)}
        )
        return list(compare_metadata(context, Base.metadata))


def revisions_base_to_head(url: str) -> list[str]:
    """Every revision id, oldest first. The history must stay linear (one head, one parent per revision)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    assert len(script.get_heads()) == 1, f"migrations have several heads: {script.get_heads()}"
    newest_first = list(script.walk_revisions())
    for rev in newest_first:
        assert not isinstance(rev.down_revision, tuple | list), f"merge revision {rev.revision}"
    ids = [rev.revision for rev in reversed(newest_first)]
    assert ids, "no migrations found"
    assert ids[-1] == head_revision(url)
    return ids


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def refused_app(url: str) -> pytest.ExceptionInfo[SchemaOutOfDate]:
    with pytest.raises(SchemaOutOfDate) as excinfo:
        create_app(Settings(database_url=url))
    return excinfo


def stamp(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": revision})


def test_upgrade_from_empty_matches_models(db_url: str, engine: Engine) -> None:
    assert current_revision(engine) is None
    assert user_tables(engine) == set()
    upgrade(db_url)
    assert current_revision(engine) == head_revision(db_url)
    assert user_tables(engine) == set(Base.metadata.tables)
    assert schema_diff(engine) == []


def test_schema_diff_sees_a_difference(db_url: str, engine: Engine) -> None:
    """The agreement check above is not vacuous: a schema that lacks a table is reported."""
    upgrade(db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE metric_rollups"))
    diff = schema_diff(engine)
    assert any(entry[0] == "add_table" and entry[1].name == "metric_rollups" for entry in diff), diff


def test_walk_down_to_base_and_up_again(db_url: str, engine: Engine) -> None:
    revisions = revisions_base_to_head(db_url)
    upgrade(db_url)
    assert current_revision(engine) == revisions[-1]

    # Down one revision at a time: head -> ... -> first -> base.
    for index in range(len(revisions) - 1, -1, -1):
        target = revisions[index - 1] if index > 0 else "base"
        downgrade(db_url, target)
        expected = revisions[index - 1] if index > 0 else None
        assert current_revision(engine) == expected, f"after downgrading from {revisions[index]}"
    assert user_tables(engine) == set(), "downgrade to base left tables behind"

    # Up one revision at a time: base -> first -> ... -> head.
    for revision in revisions:
        upgrade(db_url, revision)
        assert current_revision(engine) == revision

    assert current_revision(engine) == head_revision(db_url)
    assert schema_diff(engine) == []


def test_check_schema_refuses_empty_database_with_upgrade_command(db_url: str, engine: Engine) -> None:
    with pytest.raises(SchemaOutOfDate) as excinfo:
        check_schema(engine, db_url)
    message = str(excinfo.value)
    assert f"stagewatch db upgrade --db '{db_url}'" in message
    assert "no Stagewatch schema" in message
    # Refusing must not have created anything.
    assert current_revision(engine) is None


def test_create_app_refuses_empty_database(db_url: str) -> None:
    assert f"stagewatch db upgrade --db '{db_url}'" in str(refused_app(db_url).value)


def test_check_schema_after_upgrade_returns_head(db_url: str, engine: Engine) -> None:
    upgrade(db_url)
    assert check_schema(engine, db_url) == head_revision(db_url)
    app = create_app(Settings(database_url=db_url))
    try:
        assert app.state.stagewatch.schema_revision == head_revision(db_url)
    finally:
        app.state.stagewatch.engine.dispose()


def test_check_schema_refuses_revision_below_head(db_url: str, engine: Engine) -> None:
    """One step below head (which is base while there is a single revision) must be upgraded first."""
    upgrade(db_url)
    downgrade(db_url, "-1")
    below = current_revision(engine)
    assert below != head_revision(db_url)
    with pytest.raises(SchemaOutOfDate) as excinfo:
        check_schema(engine, db_url)
    message = str(excinfo.value)
    assert f"stagewatch db upgrade --db '{db_url}'" in message
    state = "has no Stagewatch schema yet" if below is None else f"is at schema revision {below}"
    assert state in message


def test_ensure_schema_without_auto_upgrade_refuses(db_url: str, engine: Engine) -> None:
    with pytest.raises(SchemaOutOfDate, match=re.escape(f"stagewatch db upgrade --db '{db_url}'")):
        ensure_schema(db_url, auto_upgrade=False)
    assert current_revision(engine) is None


def test_ensure_schema_auto_upgrades_empty_database(db_url: str, engine: Engine) -> None:
    assert ensure_schema(db_url, auto_upgrade=True) == head_revision(db_url)
    assert current_revision(engine) == head_revision(db_url)
    assert schema_diff(engine) == []
    # A second call finds the schema current and changes nothing.
    assert ensure_schema(db_url, auto_upgrade=True) == head_revision(db_url)


@pytest.mark.parametrize("auto_upgrade", [False, True])
def test_unknown_revision_is_refused(db_url: str, engine: Engine, auto_upgrade: bool) -> None:
    upgrade(db_url)
    stamp(engine, "f00dfeedbeef")
    expected = "at revision f00dfeedbeef, which this version of Stagewatch does not know"
    with pytest.raises(SchemaOutOfDate, match=expected) as excinfo:
        check_schema(engine, db_url)
    assert "refusing to start" in str(excinfo.value)
    assert expected in str(refused_app(db_url).value)
    # Even when allowed to upgrade, a revision from the future must be refused, not "upgraded".
    with pytest.raises(SchemaOutOfDate, match=expected):
        ensure_schema(db_url, auto_upgrade=auto_upgrade)
    assert current_revision(engine) == "f00dfeedbeef"
