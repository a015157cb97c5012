"""Stages and decisions of a run (written by live detection; read-only here)."""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import Viewer
from server.db import transaction
from server.schemas import DecisionPublic, StagePublic
from server.state import State
from server.store.history import list_decisions, list_stages
from server.store.runs import get_run

router = APIRouter(prefix="/api/v1/runs", tags=["stages and decisions"])


@router.get("/{run_id}/stages", response_model=list[StagePublic])
def read_stages(run_id: int, state: State, _: Viewer) -> list[StagePublic]:
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return [StagePublic.model_validate(s, from_attributes=True) for s in list_stages(session, run_id)]


@router.get("/{run_id}/decisions", response_model=list[DecisionPublic])
def read_decisions(run_id: int, state: State, _: Viewer) -> list[DecisionPublic]:
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return [DecisionPublic.model_validate(d, from_attributes=True) for d in list_decisions(session, run_id)]
