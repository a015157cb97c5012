"""The SQL of live detection (``server.live.detection`` holds the logic): its positions, the points it reads,
the stages it may touch, holds and the reset after a rewind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from server.errors import Invalid
from server.models import Decision, DetectorState, MetricPoint, Run, Series, Stage, utcnow

CHUNK = 20_000  # points read per query; a pass loops until it has seen all of them


def lock_run(session: Session, run_id: int) -> Run | None:
    """The run row, locked first, as every writer of a run does (no deadlock with an ingest on Postgres)."""
    return session.scalar(select(Run).where(Run.id == run_id).with_for_update())


def state_row(session: Session, run: Run, config: dict[str, Any]) -> DetectorState:
    """The run's detection state, locked; a fresh one for ``config`` if it has none."""
    row = session.get(DetectorState, run.id, with_for_update=True)
    if row is None:
        row = DetectorState(run_id=run.id, config=config, state={}, last_step=None, updated_at=utcnow())
        session.add(row)
    return row


def series_id(session: Session, run_id: int, key: str) -> int | None:
    """The id of a run's series, looked up once per transaction (``session.info`` lives as long as it)."""
    cache: dict[tuple[int, str], int | None] = session.info.setdefault("stagewatch_series_ids", {})
    if (run_id, key) not in cache:
        cache[run_id, key] = session.scalar(select(Series.id).where(Series.run_id == run_id, Series.key == key))
    return cache[run_id, key]


def points_after(
    session: Session, series: int | None, after: int | None, *, upto: int | None = None, limit: int = CHUNK
) -> Sequence[Any]:
    """``(step, value, epoch)`` rows of a series after ``after`` (up to ``upto``), in step order."""
    if series is None:
        return []
    query = select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch).where(MetricPoint.series_id == series)
    if after is not None:
        query = query.where(MetricPoint.step > after)
    if upto is not None:
        query = query.where(MetricPoint.step <= upto)
    return session.execute(query.order_by(MetricPoint.step).limit(limit)).all()


def touchable_stages(session: Session, run_id: int, from_step: int | None) -> list[Stage]:
    """The stages a pass may change: the open one and any that end at or after ``from_step`` (all if None);
    when every stage closed before ``from_step``, the last one (so that numbering continues)."""
    query = select(Stage).where(Stage.run_id == run_id)
    if from_step is not None:
        query = query.where(or_(Stage.end_step.is_(None), Stage.end_step >= from_step))
    rows = list(session.scalars(query.order_by(Stage.index)))
    if not rows and from_step is not None:
        last = session.scalar(select(Stage).where(Stage.run_id == run_id).order_by(Stage.index.desc()).limit(1))
        rows = [last] if last is not None else []
    return rows


def decision(session: Session, decision_id: int) -> Decision | None:
    return session.get(Decision, decision_id)


def forget(session: Session, run_id: int) -> None:
    """After a rewind: stages and detector state are rebuilt from the points that remain. The detector's
    configuration is cleared, so the next pass rebuilds it from the first point *silently*, every past decision
    taken as not applied (as for a new configuration): a fresh state would decide again on points it decided on
    before -- the decay a rollback just undid, say. Holds stay: a rollback sets one in the same transaction."""
    row = session.get(DetectorState, run_id, with_for_update=True)
    if row is not None:
        row.config, row.state = {}, {}
        row.last_step = row.lr = row.lr_step = None
        row.updated_at = utcnow()
    for stage in session.scalars(select(Stage).where(Stage.run_id == run_id)):
        session.delete(stage)
    session.flush()


def hold(
    session: Session, run: Run, *, epochs: float | None, steps: int | None, from_step: int | None = None
) -> DetectorState:
    """Stop feeding the detector for ``epochs`` or ``steps`` from the latest monitored point (``steps`` from
    ``from_step`` if given: a rollback's checkpoint)."""
    row = state_row(session, run, {})
    metric = str((run.detector or {}).get("metric", "epoch/train_loss"))
    series = session.scalar(select(Series).where(Series.run_id == run.id, Series.key == metric))
    if steps is not None:
        last = series.last_step if series is not None and series.last_step is not None else 0
        last = from_step if from_step is not None else last
        row.hold_until_step = max(row.hold_until_step or 0, last + steps)
    elif epochs is not None:
        if series is None or series.last_epoch is None:
            raise Invalid(f"epochs: the run's {metric!r} points carry no epoch yet; hold for a number of steps")
        row.hold_until_epoch = max(row.hold_until_epoch or 0.0, series.last_epoch + epochs)
    row.updated_at = utcnow()
    session.flush()
    return row
