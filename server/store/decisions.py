"""The decision lifecycle, every transition persisted with its actor and time.

    proposed -> approved | rejected | expired | superseded        (approve mode; a person or the timeout)
    proposed -> approved                                          (auto mode, at once, actor "auto")
    proposed -> observed                                          (observe mode: only drawn)
    approved -> delivered -> applied | failed                     (the worker fetches and acknowledges it)

An approved decision is a command: the worker fetches it from the same table (``server.store.commands``).
A newer proposal supersedes an older one still waiting, so a stale proposal is never applied. Each transition
is appended to the decision's ``history``, written to the audit log (``decision.<status>``) and to the live
feed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session

from server.errors import Conflict, NotFound
from server.models import Decision, Run, utcnow
from server.schemas import DecisionPublic
from server.store.changes import mark
from server.store.events import record_event
from server.store.feed import add_feed_event

WAITING = "proposed"
# Statuses in which a decision was never applied and never will be: the detector is told (``undo``).
NOT_APPLIED = ("rejected", "expired", "superseded", "observed")


def public(decision: Decision) -> DecisionPublic:
    out = DecisionPublic.model_validate(decision, from_attributes=True)
    if decision.status == WAITING:
        session = object_session(decision)
        run = session.get(Run, decision.run_id) if session is not None else None  # in the identity map: no query
        out.auto_approve_at = auto_approve_at(decision, run) if run is not None else None
    return out


def transition(session: Session, decision: Decision, status: str, *, actor: str, note: str = "", **extra: Any) -> None:
    """Moves ``decision`` to ``status`` and records the transition everywhere it must be seen."""
    now = utcnow()
    entry: dict[str, Any] = {"status": status, "actor": actor, "at": now.isoformat(), "note": note, **extra}
    decision.history = [*decision.history, entry]  # a new list: the JSON column tracks assignment, not mutation
    decision.status = status
    decision.updated_at = now
    if status == "delivered":
        decision.delivered_at = now
    if status == "approved":
        mark(session, decision.run_id, command=True)  # a command for the worker's long-poll
    session.flush()
    record_event(
        session,
        run_id=decision.run_id,
        kind=f"decision.{status}",
        actor=actor,
        payload={"decision_id": decision.id, "note": note, **extra},
    )
    add_feed_event(session, decision.run_id, "decision", public(decision).model_dump(mode="json"))


def create(
    session: Session,
    run: Run,
    *,
    action: str,
    factor: float | None,
    lr: float | None,
    step: int | None,
    source: str,
    actor: str,
    evidence: dict[str, Any],
    reason: str = "",
    status: str,
) -> Decision:
    now = utcnow()
    decision = Decision(
        run_id=run.id,
        action=action,
        factor=factor,
        lr=lr,
        step=step,
        status=status,
        source=source,
        evidence=evidence,
        actor=actor,
        reason=reason,
        history=[],
        overridden=False,
        created_at=now,
        updated_at=now,
    )
    session.add(decision)
    session.flush()
    transition(session, decision, status, actor=actor, note=reason)
    return decision


def waiting(session: Session, run_id: int) -> list[Decision]:
    query = select(Decision).where(Decision.run_id == run_id, Decision.status == WAITING).order_by(Decision.id)
    return list(session.scalars(query))


def pending_proposals(session: Session, run_ids: Sequence[int]) -> dict[int, int]:
    if not run_ids:
        return {}
    rows = session.execute(
        select(Decision.run_id, func.count())
        .where(Decision.run_id.in_(run_ids), Decision.status == WAITING)
        .group_by(Decision.run_id)
    )
    return {int(run_id): int(count) for run_id, count in rows}


def get_decision(session: Session, run_id: int, decision_id: int) -> Decision:
    decision = session.get(Decision, decision_id, with_for_update=True)
    if decision is None or decision.run_id != run_id:
        raise NotFound(f"run {run_id} has no decision {decision_id}")
    return decision


def _must_be_waiting(decision: Decision, verb: str) -> None:
    if decision.status != WAITING:
        raise Conflict(
            f"decision {decision.id} is {decision.status}, not proposed: only a proposal waiting for a person "
            f"can be {verb}"
        )


def approve(session: Session, decision: Decision, *, actor: str, reason: str = "") -> None:
    _must_be_waiting(decision, "approved")
    transition(session, decision, "approved", actor=actor, note=reason)


def reject(session: Session, decision: Decision, *, actor: str, reason: str = "") -> None:
    _must_be_waiting(decision, "rejected")
    transition(session, decision, "rejected", actor=actor, note=reason)


def override(
    session: Session, decision: Decision, *, actor: str, factor: float | None, lr: float | None, reason: str = ""
) -> None:
    """Approves a proposal with another factor or an explicit LR."""
    _must_be_waiting(decision, "overridden")
    proposed = {"action": decision.action, "factor": decision.factor, "lr": decision.lr}
    if lr is not None:
        decision.action, decision.factor, decision.lr = "set_lr", None, lr
    else:
        decision.action, decision.factor = "decay", factor
        decision.lr = None
    decision.overridden = True
    transition(session, decision, "approved", actor=actor, note=reason, overrides=proposed)


def supersede_waiting(session: Session, run_id: int, *, by: int, actor: str) -> list[Decision]:
    """Marks every proposal still waiting as superseded by decision ``by``; returns them."""
    stale = [d for d in waiting(session, run_id) if d.id != by]
    for decision in stale:
        transition(session, decision, "superseded", actor=actor, note=f"superseded by decision {by}")
    return stale


def expire_proposals(session: Session, run: Run, *, actor: str, note: str) -> list[Decision]:
    """Proposals nobody decided on before the run ended: they can no longer be applied."""
    stale = waiting(session, run.id)
    for decision in stale:
        transition(session, decision, "expired", actor=actor, note=note)
    return stale


def due_for_auto_approval(
    session: Session, now: dt.datetime, *, run_id: int | None = None
) -> list[tuple[Decision, Run]]:
    """Proposals of running approve-mode runs older than their run's ``auto_approve_after_s``."""
    query = (
        select(Decision, Run)
        .join(Run, Run.id == Decision.run_id)
        .where(
            Decision.status == WAITING,
            Run.mode == "approve",
            Run.auto_approve_after_s.is_not(None),
            Run.status == "running",
        )
        .order_by(Decision.id)
    )
    if run_id is not None:
        query = query.where(Run.id == run_id)
    rows = session.execute(query).all()
    out: list[tuple[Decision, Run]] = []
    for decision, run in rows:
        due = auto_approve_at(decision, run)
        if due is not None and due <= now:
            out.append((decision, run))
    return out


def auto_approve_at(decision: Decision, run: Run) -> dt.datetime | None:
    """When a waiting proposal of an approve-mode run is approved if nobody decides; None: never."""
    if decision.status != WAITING or run.mode != "approve" or run.auto_approve_after_s is None:
        return None
    try:
        return decision.created_at + dt.timedelta(seconds=run.auto_approve_after_s)
    except OverflowError:  # a delay past the calendar's end: never, and no error for the sweep of every run
        return None


def record_hold(
    session: Session, run: Run, *, actor: str, epochs: float | None, steps: int | None, reason: str
) -> None:
    payload = {"epochs": epochs, "steps": steps, "reason": reason}
    record_event(session, run_id=run.id, kind="detector.held", actor=actor, payload=payload)
    add_feed_event(session, run.id, "run", {"change": "hold", **payload})
