"""Stage checkpoints a worker reported, and rolling a run back to one.

A checkpoint row says where the worker saved its state (a path or URI; the bytes stay in the user's storage),
at which step, at the end of which stage and before which decision. Reporting the same (run, step, uri) again
returns the row already there: a worker retrying after a lost answer never makes two.

A rollback is a command like a decay (a decision with action ``rollback``, approved at once, delivered and
acknowledged through ``server.store.commands``). Nothing changes on the server until the worker acknowledges it
as applied: the worker has loaded the checkpoint then, and :func:`finish_rollback` rewinds the run to the
checkpoint's step in the same transaction as the acknowledgement -- points after it go to the audit log, the
decisions applied since are marked ``rolled_back``, the detector is rebuilt from the points that remain and held
for the backoff. One transaction, so no detection pass sees the rewound points without the hold and proposes
the decay that was just undone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.errors import Conflict, Invalid
from server.models import Checkpoint, Decision, Run, Series, utcnow
from server.schemas import CheckpointCreate, CheckpointPublic, RollbackRequest, Span
from server.store import decisions, detection
from server.store.feed import add_feed_event
from server.store.metrics import rewind

ROLLED_BACK = "rolled_back"
# Decisions that change the LR: the ones a rollback to before their applied step undoes.
_LR_ACTIONS = ("decay", "set_lr")


def public(checkpoint: Checkpoint) -> CheckpointPublic:
    return CheckpointPublic.model_validate(checkpoint, from_attributes=True)


def add_checkpoint(session: Session, run: Run, data: CheckpointCreate, *, actor: str) -> tuple[Checkpoint, bool]:
    """Records a checkpoint; returns it and whether it is new (an identical report returns the first row)."""
    found = session.scalar(
        select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.step == data.step, Checkpoint.uri == data.uri)
    )
    if found is not None:
        return found, False
    if data.decision_id is not None:
        decision = session.get(Decision, data.decision_id)
        if decision is None or decision.run_id != run.id:
            raise Invalid(f"decision_id: run {run.id} has no decision {data.decision_id}")
    checkpoint = Checkpoint(
        run_id=run.id,
        step=data.step,
        uri=data.uri,
        stage=data.stage,
        decision_id=data.decision_id,
        metrics=dict(data.metrics),  # non-finite values stay in their JSON names ("NaN", ...)
        lr=data.lr,
        actor=actor,
        created_at=utcnow(),
    )
    session.add(checkpoint)
    session.flush()
    add_feed_event(
        session, run.id, "run", {"change": "checkpoint", "checkpoint": public(checkpoint).model_dump(mode="json")}
    )
    return checkpoint, True


def list_checkpoints(session: Session, run_id: int) -> list[Checkpoint]:
    """The run's checkpoints in step order."""
    query = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step, Checkpoint.id)
    return list(session.scalars(query))


def current_step(session: Session, run_id: int) -> int | None:
    """The last step any of the run's series has stored."""
    return session.scalar(select(func.max(Series.last_step)).where(Series.run_id == run_id))


def queue_rollback(session: Session, run: Run, data: RollbackRequest, *, actor: str) -> Decision:
    """An operator's rollback to one of the run's checkpoints: a command the worker applies at its next step
    boundary. It supersedes a waiting proposal (made for the state the rollback undoes)."""
    if run.status != "running":
        raise Invalid(f"run {run.id} is {run.status}: only a running job can load a checkpoint")
    checkpoint = session.get(Checkpoint, data.checkpoint_id)
    if checkpoint is None:
        raise Invalid(f"checkpoint_id: there is no checkpoint {data.checkpoint_id}")
    if checkpoint.run_id != run.id:
        raise Invalid(
            f"checkpoint_id: checkpoint {checkpoint.id} belongs to run {checkpoint.run_id}, not to run {run.id}"
        )
    now = current_step(session, run.id)
    if now is None or checkpoint.step > now:
        raise Invalid(
            f"checkpoint_id: checkpoint {checkpoint.id} is at step {checkpoint.step}, after the run's current step "
            f"{now}; a rollback goes back"
        )
    waiting = session.scalar(
        select(Decision.id).where(
            Decision.run_id == run.id, Decision.action == "rollback", Decision.status.in_(("approved", "delivered"))
        )
    )
    if waiting is not None:
        raise Conflict(f"run {run.id} already has a rollback waiting for its worker (command {waiting})")
    backoff = data.backoff or (Span.model_validate(run.reject_backoff) if run.reject_backoff else None)
    if backoff is not None and backoff.epochs is not None:
        metric = str((run.detector or {}).get("metric", "epoch/train_loss"))
        epoch = session.scalar(select(Series.last_epoch).where(Series.run_id == run.id, Series.key == metric))
        if epoch is None:
            raise Invalid(f"backoff: the run's {metric!r} points carry no epoch; give the backoff in steps")
    evidence: dict[str, Any] = {
        "checkpoint": {"id": checkpoint.id, "step": checkpoint.step, "uri": checkpoint.uri, "stage": checkpoint.stage},
        "backoff": backoff.model_dump(exclude_none=True) if backoff is not None else None,
    }
    command = decisions.create(
        session,
        run,
        action="rollback",
        factor=None,
        lr=checkpoint.lr,
        step=checkpoint.step,
        source="operator",
        actor=actor,
        evidence=evidence,
        reason=data.reason,
        status="approved",
    )
    decisions.supersede_waiting(session, run.id, by=command.id, actor=actor)
    return command


def finish_rollback(session: Session, run: Run, command: Decision, *, actor: str) -> None:
    """The worker loaded the checkpoint of ``command`` (acknowledged as applied): rewind the run to its step, mark
    what was applied since ``rolled_back``, rebuild the detector from what remains and hold it for the backoff."""
    checkpoint = command.checkpoint
    assert checkpoint is not None, "a rollback command carries its checkpoint"
    step = int(checkpoint["step"])
    outcome = rewind(
        session, run, step, reason=f"rollback to checkpoint {checkpoint['id']} (command {command.id})", actor=actor
    )
    detection.forget(session, run.id)
    add_feed_event(session, run.id, "run", {"change": "rewind", "step": step})
    undone = session.scalars(
        select(Decision)
        .where(
            Decision.run_id == run.id,
            Decision.status == "applied",
            Decision.action.in_(_LR_ACTIONS),
            Decision.applied_step >= step,
        )
        .order_by(Decision.id)
    )
    for decision in list(undone):
        decisions.transition(
            session,
            decision,
            ROLLED_BACK,
            actor=actor,
            note=f"rolled back to the checkpoint at step {step} by command {command.id}",
            rollback=command.id,
        )
    backoff = (command.evidence or {}).get("backoff")
    if backoff:
        span = Span.model_validate(backoff)
        # From the checkpoint's step: the rewind made it the latest point. (An epoch backoff was checked when the
        # rollback was queued; should the points have lost their epochs since, the hold is given in steps.)
        try:
            detection.hold(session, run, epochs=span.epochs, steps=span.steps)
        except Invalid:
            span = Span(steps=1)
            detection.hold(session, run, epochs=None, steps=1)
        decisions.record_hold(
            session, run, actor=actor, epochs=span.epochs, steps=span.steps, reason=f"rollback (command {command.id})"
        )
    command.evidence = {**command.evidence, "rewind_event_id": outcome.event_id}
