from __future__ import annotations

from fastapi import APIRouter

from server import __version__
from server.schemas import Health
from server.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_health(state: State) -> Health:
    """Liveness and the schema revision in use. Needs no token."""
    return Health(
        status="ok",
        version=__version__,
        database=state.engine.dialect.name,
        schema_revision=state.schema_revision,
    )
