from __future__ import annotations

import logging
from typing import Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from server import __version__
from server.schemas import Health
from server.state import State

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0


class Ready(BaseModel):
    status: Literal["ready"]
    database: str


class NotReady(BaseModel):
    detail: str
    code: Literal["not_ready"]


@router.get("/healthz", response_model=Health)
def read_health(state: State) -> Health:
    """Liveness: the process answers (the database is not asked; see /readyz). The schema revision in use.
    Needs no token."""
    return Health(
        status="ok",
        version=__version__,
        database=state.engine.dialect.name,
        schema_revision=state.schema_revision,
    )


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": NotReady, "description": "The database did not answer `SELECT 1` in time."}},
)
async def read_ready(request: Request, state: State) -> Ready | JSONResponse:
    """Readiness: 200 when the database answers `SELECT 1` within 5 s, else 503. Needs no token; the 503 names
    no host or database (the server log has the error)."""

    def ping() -> None:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # One readiness query at a time: against a database that hangs (a host that drops packets), each probe would
    # otherwise park one more worker thread until the OS gives up on the connection, draining the threads that
    # every synchronous route shares. Probes that find the check still running wait, then answer 503. One
    # limiter per app, made on its event loop.
    limiter = getattr(request.app.state, "ready_limiter", None)
    if limiter is None:
        limiter = request.app.state.ready_limiter = anyio.CapacityLimiter(1)
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            await anyio.to_thread.run_sync(ping, abandon_on_cancel=True, limiter=limiter)
    except TimeoutError:
        detail = f"the database did not answer within {READY_TIMEOUT_S:g} s"
        return JSONResponse({"detail": detail, "code": "not_ready"}, status_code=503)
    except Exception as exc:
        log.warning("readiness check failed: %s", exc)
        detail = f"the database did not answer: {type(exc).__name__}"
        return JSONResponse({"detail": detail, "code": "not_ready"}, status_code=503)
    return Ready(status="ready", database=state.engine.dialect.name)
