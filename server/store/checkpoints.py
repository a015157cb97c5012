"""Stage checkpoints a worker reported, and rolling a run back to one.

A checkpoint row says where the worker saved its state (a path or URI; the bytes stay in the user's storage),
at which step, at the end of which stage and before which decision. Reporting the same (run, step, uri) again
returns the row already there: a worker retrying after a lost answer never makes two.

A rollback is a command like a decay (a decision with action ``rollback``, approved at once, delivered and
acknowledged through ``server.store.commands``). Nothing changes on the server until the worker acknowledges it
as applied: the worker has loaded the checkpoint then, and has rewound the run to the checkpoint's step just before
(``POST /runs/{id}/rewind``: points after it go to the audit log). :func:`finish_rollback`, in the same transaction
as the acknowledgement, marks the decisions applied since ``rolled_back``, rebuilds the detector silently from the
points that remain and holds it for the backoff. A rewind alone already rebuilds the detector without letting it
act on the past (``server.store.detection.forget``), so no pass between the two proposes the decay that is being
undone; the hold keeps it from proposing it again at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.errors import Conflict, Invalid
from server.models import Checkpoint, Decision, Event, MetricPoint, Run, Series, Stage, utcnow
from server.schemas import CheckpointCreate, CheckpointPublic, RollbackRequest, Span, encode_stored_value
from server.store import decisions, detection
from server.store.feed import add_feed_event
from server.store.metrics import REWOUND

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
        stage=data.stage,  # None: the stage that holds its step, looked up when read (detection may lag)
        decision_id=data.decision_id,
        # Non-finite values stay in their JSON names ("NaN", ...). None given: read out of the points when listed
        # (an acknowledgement reaches the server before the points of its step).
        metrics=dict(data.metrics),
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


def with_stages(session: Session, run_id: int, checkpoints: list[Checkpoint]) -> list[CheckpointPublic]:
    """Public checkpoints. One the worker reported without a stage gets the index of the run's stage that holds
    its step (the last one started by then), as live detection knows the stages now; one without metrics, each
    metric's last value at or before its step."""
    starts = list(session.execute(select(Stage.start_step, Stage.index).where(Stage.run_id == run_id)))
    out = []
    for checkpoint in checkpoints:
        item = public(checkpoint)
        if not item.metrics:
            item.metrics = values_at(session, run_id, checkpoint.step)
        if item.stage is None:
            started = [(start, index) for start, index in starts if start <= checkpoint.step]
            item.stage = max(started)[1] if started else None
        out.append(item)
    return out


def values_at(session: Session, run_id: int, step: int) -> dict[str, Any]:
    """Each metric's last value at or before ``step`` (one indexed probe per key; a run has a few dozen)."""
    out: dict[str, Any] = {}
    for series_id, key in session.execute(select(Series.id, Series.key).where(Series.run_id == run_id)):
        value = session.execute(
            select(MetricPoint.value)
            .where(MetricPoint.series_id == series_id, MetricPoint.step <= step)
            .order_by(MetricPoint.step.desc())
            .limit(1)
        ).first()
        if value is not None:
            out[key] = encode_stored_value(value[0])
    return out


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
    if now is None:
        raise Invalid(f"checkpoint_id: run {run.id} has no points yet; there is nothing to roll back")
    if checkpoint.step > now:
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
    """The worker loaded the checkpoint of ``command`` (acknowledged as applied): mark what was applied since
    ``rolled_back``, rebuild the detector from what remains and hold it for the backoff."""
    checkpoint = command.checkpoint
    assert checkpoint is not None, "a rollback command carries its checkpoint"
    step = int(checkpoint["step"])
    # The worker rewound the run to the checkpoint's step just before (POST /runs/{id}/rewind: the Python client
    # does, so that its spool knows the rewind). Not here: an acknowledgement repeated by a job resumed from a
    # later checkpoint would rewind away what it trained since the rollback.
    event_id = session.scalar(select(func.max(Event.id)).where(Event.run_id == run.id, Event.kind == REWOUND))
    detection.forget(session, run.id)  # the detector rebuilt silently from the points up to the checkpoint
    # A proposal made while the rollback travelled judged the trajectory it abandons.
    decisions.supersede_waiting(session, run.id, by=command.id, actor=actor)
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
        # From the checkpoint's step (epochs: from the monitored metric's last epoch, which the rewind made the
        # checkpoint's). An epoch backoff was checked when the rollback was queued; should the points have lost
        # their epochs since, the hold is one step.
        try:
            detection.hold(session, run, epochs=span.epochs, steps=span.steps, from_step=step)
        except Invalid:
            span = Span(steps=1)
            detection.hold(session, run, epochs=None, steps=1, from_step=step)
        decisions.record_hold(
            session, run, actor=actor, epochs=span.epochs, steps=span.steps, reason=f"rollback (command {command.id})"
        )
    command.evidence = {**command.evidence, "rewind_event_id": event_id}
