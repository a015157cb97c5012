"""The per-run command queue: approved decisions the worker fetches, applies and acknowledges."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.errors import Conflict, NotFound
from server.models import Decision, Run, utcnow
from server.schemas import CommandAck, CommandCreate
from server.store.events import record_event

PENDING = ("approved", "delivered")


def create_command(
    session: Session, run: Run, data: CommandCreate, *, actor: str, source: str = "operator"
) -> Decision:
    now = utcnow()
    command = Decision(
        run_id=run.id,
        action=data.action,
        factor=data.factor,
        lr=data.lr,
        status="approved",
        source=source,
        evidence={},
        actor=actor,
        reason=data.reason,
        created_at=now,
        updated_at=now,
    )
    session.add(command)
    session.flush()
    record_event(
        session,
        run_id=run.id,
        kind="command.created",
        actor=actor,
        payload={"command_id": command.id, **data.model_dump(mode="json")},
    )
    return command


def take_pending(session: Session, run_id: int, *, after: int = 0) -> list[Decision]:
    """Commands not yet acknowledged with an id above ``after``, oldest first; marks them delivered."""
    commands = list(
        session.scalars(
            select(Decision)
            .where(Decision.run_id == run_id, Decision.status.in_(PENDING), Decision.id > after)
            .order_by(Decision.id)
        )
    )
    now = utcnow()
    for command in commands:
        if command.status == "approved":
            command.status = "delivered"
            command.delivered_at = command.updated_at = now
            record_event(
                session, run_id=run_id, kind="command.delivered", actor="worker", payload={"command_id": command.id}
            )
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
    now = utcnow()
    command.status = ack.status
    command.applied_step, command.applied_lr, command.ack_message = ack.step, ack.lr, ack.message
    command.acked_at = command.updated_at = now
    record_event(
        session,
        run_id=run_id,
        kind=f"command.{ack.status}",
        actor=actor,
        payload={"command_id": command_id, **ack.model_dump(mode="json")},
    )
    return command
