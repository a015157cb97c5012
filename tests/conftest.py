"""Shared fixtures: a fresh database per test on both engines, a migrated schema, and a real HTTP server.

Every test that takes ``db_url`` runs twice: on a SQLite file in its own temporary directory, and on the
real Postgres server (``STAGEWATCH_TEST_POSTGRES``, default 127.0.0.1:5432) in a schema of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy import Engine

from benchmarks.bench_dashboard import CHROMIUM, CHROMIUM_ARGS
from server.app import create_app
from server.db import make_engine, make_session_factory, transaction
from server.migrate import upgrade
from server.settings import Settings
from server.store.tokens import create_token

POSTGRES_ADMIN = os.environ.get("STAGEWATCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_schema_url(schema: str) -> str:
    # search_path in the connection options puts every table, and alembic's version table, in the schema.
    sep = "&" if "?" in POSTGRES_ADMIN else "?"
    return f"{POSTGRES_ADMIN}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'stagewatch.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield postgres_schema_url(schema)
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on this test's own empty database (``db_url``), disposed afterwards."""
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _database_url(name: str) -> str:
    return POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The schema at head, migrated once per test session: a SQLite file and a Postgres template database.
    Each test then gets a copy (a file copy; ``CREATE DATABASE ... TEMPLATE``), not a run of Alembic."""
    sqlite_file = tmp_path_factory.mktemp("template") / "stagewatch.db"
    upgrade(f"sqlite:///{sqlite_file}")
    template = f"sw_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {template}")
    try:
        upgrade(_database_url(template))  # Alembic's engine is gone afterwards: a template must have no sessions
        yield {"sqlite": str(sqlite_file), "postgres": template}
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {template} WITH (FORCE)")


def sqlite_copy(migrated_templates: dict[str, str], directory: Path) -> str:
    """A migrated SQLite database of its own in ``directory`` (for modules that test one engine only)."""
    target = directory / "stagewatch.db"
    shutil.copyfile(migrated_templates["sqlite"], target)
    return f"sqlite:///{target}"


@pytest.fixture(params=["sqlite", "postgres"])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path, migrated_templates: dict[str, str]) -> Iterator[str]:
    """A database of its own for this test, already at the head revision."""
    if request.param == "sqlite":
        yield sqlite_copy(migrated_templates, tmp_path)
        return
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {migrated_templates['postgres']}")
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(migrated_url: str) -> Settings:
    return Settings(database_url=migrated_url, auth=False, heartbeat_grace_s=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _PromptServer(uvicorn.Server):
    """uvicorn's server, woken at once by ``stop()`` instead of at its next 0.1 s tick: a test suite starts and
    stops hundreds of servers, and the ticks alone were a minute of waiting."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stopped: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 0.1)

    def stop(self) -> None:
        self.should_exit = True
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stopped.set)


class LiveServer:
    """The real app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, app: FastAPI, *, port: int | None = None) -> None:
        self.app = app
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = _PromptServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.app.state.stagewatch.engine.dispose()


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def make_run(client: httpx.Client, **fields: object) -> int:
    response = client.post("/api/v1/runs", json={"name": "test", **fields})
    assert response.status_code == 201, response.text
    run_id: int = response.json()["id"]
    return run_id


def points(key: str, steps: range, value: float = 0.5) -> list[dict[str, object]]:
    return [{"key": key, "step": s, "value": value + s * 1e-3} for s in steps]


@pytest.fixture
def secured(migrated_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The real app with auth on, and a token per role: ``(url, {"viewer": ..., "worker": ..., "operator": ...})``."""
    engine = make_engine(migrated_url)
    tokens: dict[str, str] = {}
    with transaction(make_session_factory(engine), write=True) as session:
        for role in ("viewer", "worker", "operator"):
            _, tokens[role] = create_token(session, name=f"{role}-token", role=role)
    with LiveServer(create_app(Settings(database_url=migrated_url, auth=True))) as live:
        yield live.url, tokens
    engine.dispose()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One Chromium for the session (Debian's, driven by Playwright; never `playwright install`)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install chromium) or point "
            "STAGEWATCH_CHROMIUM at a Chromium binary. The dashboard tests need a real browser.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()
