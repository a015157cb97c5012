"""The per-run command queue: approved decisions the worker fetches, applies and acknowledges.

A command is a :class:`server.models.Decision` in status ``approved`` (by an operator, by auto mode or by the
auto-approval timeout); fetching it marks it ``delivered``, the worker's acknowledgement ``applied`` or
``failed`` with the step and LR (``server.store.decisions`` records each transition).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.errors import Conflict, NotFound
from server.models import Decision, Run, utcnow
from server.schemas import CommandAck, CommandCreate
from server.store import checkpoints, decisions
from server.store.points import driver_execute

PENDING = ("approved", "delivered")


def create_command(session: Session, run: Run, data: CommandCreate, *, actor: str) -> Decision:
    """An operator's decision with no proposal behind it ("decay now", "set the LR", "stop"): approved at
    once. It supersedes any proposal still waiting, which was made for the LR this command changes."""
    command = decisions.create(
        session,
        run,
        action=data.action,
        factor=data.factor,
        lr=data.lr,
        step=None,
        source="operator",
        actor=actor,
        evidence={},
        reason=data.reason,
        status="approved",
    )
    decisions.supersede_waiting(session, run.id, by=command.id, actor=actor)
    return command


def take_pending(session: Session, run_id: int, *, after: int = 0) -> list[Decision]:
    """Commands not yet acknowledged with an id above ``after``, oldest first; marks them delivered."""
    # Every ingest asks, and almost always there is none: one indexed driver-level probe (ix_decisions_run_id_status)
    # answers that for ~0.05 ms, where the ORM query costs ~0.5 ms. (Flushed first: it must see pending ORM rows.)
    session.flush()
    if not driver_execute(
        session,
        "SELECT 1 FROM decisions WHERE run_id = ? AND status IN (?, ?) AND id > ? LIMIT 1",
        (run_id, *PENDING, after),
    ):
        return []
    commands = list(
        session.scalars(
            select(Decision)
            .where(Decision.run_id == run_id, Decision.status.in_(PENDING), Decision.id > after)
            .order_by(Decision.id)
        )
    )
    for command in commands:
        if command.status == "approved":
            decisions.transition(session, command, "delivered", actor="worker")
    return commands


def has_pending(session: Session, run_id: int, *, after: int = 0) -> bool:
    query = select(Decision.id).where(Decision.run_id == run_id, Decision.status.in_(PENDING), Decision.id > after)
    return session.scalar(query.limit(1)) is not None


def acknowledge(session: Session, run_id: int, command_id: int, ack: CommandAck, *, actor: str) -> Decision:
    """Record where the worker applied a command. Repeating the same ack is a no-op (a worker retrying after
    a lost response); a different ack of an acknowledged command is a conflict."""
    command = session.get(Decision, command_id, with_for_update=True)
    if command is None or command.run_id != run_id:
        raise NotFound(f"run {run_id} has no command {command_id}")
    if command.status in ("applied", "failed"):
        same = (command.status, command.applied_step, command.applied_lr) == (ack.status, ack.step, ack.lr)
        if same:
            return command
        raise Conflict(
            f"command {command_id} was already acknowledged as {command.status} at step {command.applied_step} "
            f"(lr {command.applied_lr}); a command is applied once"
        )
    if command.status not in PENDING:
        raise Conflict(f"command {command_id} is {command.status}, not waiting for the worker")
    command.applied_step, command.applied_lr, command.ack_message = ack.step, ack.lr, ack.message
    command.acked_at = utcnow()
    run = session.get(Run, run_id)
    assert run is not None  # the route locked it
    if ack.checkpoint is not None:  # saved just before it was applied: the end of the stage it ends
        data = ack.checkpoint
        if data.decision_id is None:
            data = data.model_copy(update={"decision_id": command.id})
        checkpoints.add_checkpoint(session, run, data, actor=actor)
    decisions.transition(session, command, ack.status, actor=actor, note=ack.message, step=ack.step, lr=ack.lr)
    if command.action == "rollback" and ack.status == "applied":
        checkpoints.finish_rollback(session, run, command, actor=actor)
    return command
