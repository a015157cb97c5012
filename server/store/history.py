"""Stages and decisions of a run."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import Decision, Stage


def list_stages(session: Session, run_id: int) -> list[Stage]:
    return list(session.scalars(select(Stage).where(Stage.run_id == run_id).order_by(Stage.index)))


def list_decisions(session: Session, run_id: int) -> list[Decision]:
    return list(session.scalars(select(Decision).where(Decision.run_id == run_id).order_by(Decision.id)))
