"""Operator decisions on a run: approve, reject or override a proposal; hold the detector.

"Decay now", "set the LR" and "stop" need no proposal: they are commands (``POST /runs/{id}/commands``).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import Operator
from server.db import transaction
from server.errors import ERROR_RESPONSES, Invalid
from server.models import Run
from server.schemas import (
    DecideRequest,
    DecisionId,
    DecisionPublic,
    HoldPublic,
    HoldRequest,
    OverrideRequest,
    RejectRequest,
    RunId,
    Span,
)
from server.state import State
from server.store import decisions, detection
from server.store.runs import get_run

router = APIRouter(prefix="/api/v1/runs", tags=["stages and decisions"], responses=ERROR_RESPONSES)


def _running(run: Run) -> None:
    if run.status != "running":
        raise Invalid(f"run {run.id} is {run.status}: nothing can be applied to it any more")


@router.post("/{run_id}/decisions/{decision_id}/approve", response_model=DecisionPublic)
def approve(run_id: RunId, decision_id: DecisionId, data: DecideRequest, state: State, who: Operator) -> DecisionPublic:
    """Approve a proposal: it becomes a command for the worker. 409 unless it is `proposed`."""
    with transaction(state.sessions, write=True) as session:
        _running(get_run(session, run_id, for_update=True))
        decision = decisions.get_decision(session, run_id, decision_id)
        decisions.approve(session, decision, actor=who.actor, reason=data.reason)
        result = decisions.public(decision)
    return result


@router.post("/{run_id}/decisions/{decision_id}/reject", response_model=DecisionPublic)
def reject(run_id: RunId, decision_id: DecisionId, data: RejectRequest, state: State, who: Operator) -> DecisionPublic:
    """Reject a proposal. The detector starts the stage again and, with a `backoff` (or the run's
    `reject_backoff`), is held for that many epochs or steps."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        decision = decisions.get_decision(session, run_id, decision_id)
        decisions.reject(session, decision, actor=who.actor, reason=data.reason)
        backoff = data.backoff or (Span.model_validate(run.reject_backoff) if run.reject_backoff else None)
        if backoff is not None:
            detection.hold(session, run, epochs=backoff.epochs, steps=backoff.steps)
        result = decisions.public(decision)
    return result


@router.post("/{run_id}/decisions/{decision_id}/override", response_model=DecisionPublic)
def override(
    run_id: RunId, decision_id: DecisionId, data: OverrideRequest, state: State, who: Operator
) -> DecisionPublic:
    """Approve a proposal with another `factor`, or an explicit `lr` instead."""
    with transaction(state.sessions, write=True) as session:
        _running(get_run(session, run_id, for_update=True))
        decision = decisions.get_decision(session, run_id, decision_id)
        decisions.override(session, decision, actor=who.actor, factor=data.factor, lr=data.lr, reason=data.reason)
        result = decisions.public(decision)
    return result


@router.post("/{run_id}/hold", response_model=HoldPublic)
def hold(run_id: RunId, data: HoldRequest, state: State, who: Operator) -> HoldPublic:
    """Stop feeding the run's detector for `epochs` (or `steps`) from its latest point: no proposal until then."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        row = detection.hold(session, run, epochs=data.epochs, steps=data.steps)
        decisions.record_hold(session, run, actor=who.actor, epochs=data.epochs, steps=data.steps, reason=data.reason)
        result = HoldPublic(run_id=run_id, hold_until_step=row.hold_until_step, hold_until_epoch=row.hold_until_epoch)
    return result
