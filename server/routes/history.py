"""Stages and decisions of a run (written by live detection; read-only here)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from server.auth import Viewer
from server.db import transaction
from server.errors import ERROR_RESPONSES
from server.schemas import MAX_STEP, DecisionPublic, DetectionProgress, RunId, StagePublic
from server.state import AppState, State
from server.store import decisions
from server.store.history import detection_progress, list_decisions, list_stages
from server.store.runs import get_run

router = APIRouter(prefix="/api/v1/runs", tags=["stages and decisions"], responses=ERROR_RESPONSES)


@router.get("/{run_id}/stages", response_model=list[StagePublic])
def read_stages(run_id: RunId, state: State, _: Viewer) -> list[StagePublic]:
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return [StagePublic.model_validate(s, from_attributes=True) for s in list_stages(session, run_id)]


@router.get("/{run_id}/decisions", response_model=list[DecisionPublic])
def read_decisions(run_id: RunId, state: State, _: Viewer) -> list[DecisionPublic]:
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return [decisions.public(d) for d in list_decisions(session, run_id)]


# Detection runs in its own thread after ingest; a waiting client re-reads the progress this often.
PROGRESS_POLL_S = 0.05


def _progress(state: AppState, run_id: int) -> DetectionProgress:
    with transaction(state.sessions) as session:
        return detection_progress(session, get_run(session, run_id))


@router.get("/{run_id}/detection", response_model=DetectionProgress)
async def read_detection(
    run_id: RunId,
    state: State,
    _: Viewer,
    wait: Annotated[float, Query(ge=0, le=60, description="Wait up to this many seconds for the condition.")] = 0,
    through_step: Annotated[
        int | None,
        Query(ge=0, le=MAX_STEP, description="Wait until detection has examined this step; default: all stored."),
    ] = None,
) -> DetectionProgress:
    """How far live detection has examined the run's stored points, and whether its detector waits for the
    outcome of a decision. With `wait`, the answer comes once detection has caught up with what is stored (or
    has examined `through_step`), or when `wait` seconds have passed: read `caught_up` / `through_step` to
    know which. Clients and tests wait on this instead of sleeping."""
    deadline = time.monotonic() + wait
    while True:
        progress = await run_in_threadpool(_progress, state, run_id)
        if through_step is not None:
            done = progress.through_step is not None and progress.through_step >= through_step
        else:
            done = progress.caught_up
        if done or time.monotonic() >= deadline:
            return progress
        await asyncio.sleep(PROGRESS_POLL_S)
