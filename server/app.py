"""The app factory: no I/O at import time; tests and the CLI build as many apps as they like."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from sqlalchemy import event

import web
from server import __version__, replicas
from server.db import make_engine, make_session_factory
from server.errors import InternalErrors, install_error_handlers
from server.ingest_route import IngestRoute
from server.limits import BodySizeLimit
from server.live.engine import LiveDetection
from server.migrate import check_schema
from server.routes import checkpoints, commands, decisions, health, history, metrics, runs, stream, whoami
from server.settings import Settings
from server.state import AppState
from server.store import changes
from server.web_security import install as install_web_security

log = logging.getLogger("stagewatch.app")
POSTGRES_DETECTION_THREADS = 4

API_DESCRIPTION = """Stagewatch records training runs (metrics, stages, learning-rate decisions) and serves them.

Authenticate with `Authorization: Bearer <token>`; tokens come from `stagewatch token create --role ROLE`.
Errors are JSON: `{"detail": "<what was wrong>", "code": "<slug>"}`.
"""


def create_app(settings: Settings, *, check: bool = True) -> FastAPI:
    """Build the service. With ``check`` (the default) the database schema must be at the current
    revision; run ``stagewatch db upgrade`` first (``server.migrate``)."""
    engine = make_engine(settings.database_url)
    try:
        revision = check_schema(engine, settings.database_url) if check else None
    except BaseException:
        engine.dispose()  # a refused start must not leak its connection pool
        raise
    state = AppState(settings=settings, engine=engine, sessions=make_session_factory(engine), schema_revision=revision)

    # One hook acts on every commit (wakes streams, long-polls and detection): see server.store.changes.
    event.listen(state.sessions, "after_commit", state.after_commit)
    event.listen(state.sessions, "after_rollback", changes.take)
    postgres = engine.dialect.name == "postgresql"
    if postgres:  # other server processes on the database are woken too (server.replicas)
        event.listen(state.sessions, "before_commit", replicas.notify_in_transaction(state.origin))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Waiters wait on this loop; live detection runs in its own thread.
        state.loop = asyncio.get_running_loop()
        listener = None
        if postgres:
            listener = replicas.ChangeListener(replicas.libpq_url(engine), state.origin, state.remote_change)
            listener.start()
            # Listening before the first request is answered: a change committed elsewhere after that is seen.
            if not await asyncio.to_thread(listener.wait_listening, 10.0):
                log.warning("not yet listening for other server processes' changes; waiters re-check the database")
        threads = settings.detection_threads or (POSTGRES_DETECTION_THREADS if postgres else 1)
        state.live = LiveDetection(state.sessions, threads=threads)
        state.live.start()
        try:
            yield
        finally:
            if listener is not None:
                listener.stop()
            state.live.stop()
            state.live = None
            state.loop = None

    # /docs and /redoc come from packaged assets, not a CDN: server.web_security.
    app = FastAPI(
        title="Stagewatch",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.stagewatch = state
    # BodySizeLimit inside InternalErrors (added after it): a streamed body's BodyTooLarge reaches BodySizeLimit
    # (413) instead of being answered as an internal error (500).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(InternalErrors)  # outside the size limit, whose own exception answers 413
    install_error_handlers(app)
    routers = (health, runs, metrics, history, decisions, commands, checkpoints, stream, whoami)
    for router in (module.router for module in routers):
        app.include_router(router)
    # First in the table: a metrics batch skips the scan and FastAPI's dependency solving (server.ingest_route).
    app.router.routes.insert(0, IngestRoute())
    # Before the /ui mount, which would answer this path first: plotly.js of the installed package, no CDN.
    app.add_api_route("/ui/vendor/plotly.min.js", web.plotly_js, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui", web.WebAssets(directory=Path(web.__file__).parent, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    install_web_security(app, settings)  # last: the Host check and the headers wrap everything, 413s included
    return app
