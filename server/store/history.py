"""Stages and decisions of a run."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.models import Decision, DetectorState, Run, Series, Stage
from server.schemas import DetectionProgress


def list_stages(session: Session, run_id: int) -> list[Stage]:
    return list(session.scalars(select(Stage).where(Stage.run_id == run_id).order_by(Stage.index)))


def list_decisions(session: Session, run_id: int) -> list[Decision]:
    return list(session.scalars(select(Decision).where(Decision.run_id == run_id).order_by(Decision.id)))


def detection_progress(session: Session, run: Run) -> DetectionProgress:
    """Where live detection of ``run`` stands against what is stored (see ``server.live.detection``)."""
    config = run.detector or {}
    metric = str(config.get("metric", "epoch/train_loss")) if config else None
    lr_key = str(config.get("lr_key", "lr"))
    keys = [k for k in (metric, lr_key) if k is not None]
    stored = dict(
        session.execute(select(Series.key, Series.last_step).where(Series.run_id == run.id, Series.key.in_(keys))).all()
    )
    row = session.get(DetectorState, run.id)
    feed = (row.state or {}).get("feed") if row is not None else None
    through = row.last_step if row is not None else None
    lr_through = row.lr_step if row is not None else None
    waiting = (feed or {}).get("waiting") or {}
    metric_stored = stored.get(metric) if metric is not None else None
    lr_stored = stored.get(lr_key)
    caught_up = _at_least(lr_through, lr_stored) and (metric is None or _at_least(through, metric_stored))
    return DetectionProgress(
        run_id=run.id,
        metric=metric,
        lr_key=lr_key,
        through_step=through if metric is not None else None,
        lr_through_step=lr_through,
        stored_through_step=metric_stored,
        lr_stored_through_step=lr_stored,
        fed_through_step=(feed or {}).get("last_step", through) if metric is not None else None,
        waiting_on=waiting.get("id"),
        caught_up=caught_up,
    )


def _at_least(position: int | None, stored: int | None) -> bool:
    return stored is None or (position is not None and position >= stored)
