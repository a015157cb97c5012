"""Runs: create, read, list with filters and cursor pagination, update, heartbeats, derived status."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, and_, delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Invalid, run_not_found
from server.models import Run, RunTag, Series, Stage, utcnow
from server.schemas import (
    MAX_ID,
    CurrentStage,
    LatestValue,
    RunCreate,
    RunPublic,
    RunUpdate,
    encode_stored_value,
    encode_value,
)
from server.store.changes import mark
from server.store.decisions import expire_proposals, pending_proposals
from server.store.events import record_event
from server.store.feed import add_feed_event
from server.store.points import driver_rowcount, to_driver


@dataclass(frozen=True)
class RunFilter:
    status: str | None = None
    project: str | None = None
    tag: str | None = None
    name: str | None = None
    client_key: str | None = None


def get_run(session: Session, run_id: int, *, for_update: bool = False) -> Run:
    query = select(Run).where(Run.id == run_id)
    if for_update:
        # Serialises writers of one run on Postgres; on SQLite the write transaction already holds the lock.
        query = query.with_for_update()
    run = session.scalar(query)
    if run is None:
        raise run_not_found(run_id)
    return run


def touch_run(session: Session, run_id: int) -> None:
    """Lock the run and record its heartbeat in one driver-level statement (the ingest hot path; ``get_run``
    with ``for_update`` and the ORM's flush of the heartbeat cost ~1 ms more). On Postgres the UPDATE's row
    lock conflicts with every ``FOR UPDATE`` of the run, so writers of a run stay serialised and the run row is
    still locked first; on SQLite the write transaction holds the database lock already. 404 if no such run."""
    if not driver_rowcount(
        session,
        "UPDATE runs SET last_heartbeat_at = ? WHERE id = ?",
        (to_driver(session, "runs", "last_heartbeat_at", utcnow()), run_id),
    ):
        raise run_not_found(run_id)


def run_with_key(session: Session, client_key: str) -> Run | None:
    return session.scalar(select(Run).where(Run.client_key == client_key))


def create_run(session: Session, data: RunCreate, *, actor: str) -> Run:
    return create_or_get_run(session, data, actor=actor)[0]


def create_or_get_run(session: Session, data: RunCreate, *, actor: str) -> tuple[Run, bool]:
    """The new run and True; or, when a run already has ``data.client_key``, that run untouched and False."""
    if data.client_key is not None:
        existing = run_with_key(session, data.client_key)
        if existing is not None:
            return existing, False
    now = utcnow()
    run = Run(
        client_key=data.client_key,
        name=data.name or "",
        project=data.project,
        notes=data.notes,
        status="running",
        config=data.config,
        mode=data.mode,
        detector=data.detector.model_dump(mode="json") if data.detector is not None else None,
        auto_approve_after_s=data.auto_approve_after_s,
        reject_backoff=data.reject_backoff.model_dump(mode="json", exclude_none=True) if data.reject_backoff else None,
        created_at=now,
        updated_at=now,
        last_heartbeat_at=now,
    )
    try:
        # A savepoint, so that losing the race below leaves the request's transaction usable.
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        # A concurrent create with the same key committed first (on Postgres our insert waited for it on the
        # unique index); it is now visible to this read-committed transaction.
        existing = run_with_key(session, data.client_key) if data.client_key is not None else None
        if existing is None:
            raise
        return existing, False
    if not data.name:
        run.name = f"run-{run.id}"
    _set_tags(session, run.id, data.tags)
    record_event(session, run_id=run.id, kind="run.created", actor=actor, payload=data.model_dump(mode="json"))
    add_feed_event(session, run.id, "run", {"change": "created"})
    return run, True


def update_run(session: Session, run: Run, data: RunUpdate, *, actor: str) -> Run:
    changes = data.model_dump(exclude_unset=True, mode="json")
    before: dict[str, object] = {}
    now = utcnow()
    if "name" in changes:
        if data.name is None:
            raise Invalid("name: cannot be null")
        before["name"], run.name = run.name, data.name
    if "notes" in changes:
        before["notes"], run.notes = run.notes, data.notes or ""
    if "tags" in changes:
        before["tags"] = tags_of(session, [run.id])[run.id]
        _set_tags(session, run.id, data.tags or [])
    if "status" in changes:
        if data.status is None:
            raise Invalid("status: cannot be null")
        before["status"], run.status = run.status, data.status
        mark(session, run.id, command=True)  # a long-poll of a run that ended answers at once
        # A run that ended and reports running again (resumed from a checkpoint) is alive again.
        run.ended_at = None if data.status == "running" else now
        if data.status == "running":
            run.last_heartbeat_at = now
        else:
            expire_proposals(session, run, actor=actor, note=f"the run is {data.status}")
    if "mode" in changes:
        if data.mode is None:
            raise Invalid("mode: cannot be null")
        before["mode"], run.mode = run.mode, data.mode
    if "detector" in changes:
        # A new configuration makes live detection rebuild its state from the stored points (server.live).
        before["detector"], run.detector = run.detector, changes["detector"]
    if "auto_approve_after_s" in changes:
        before["auto_approve_after_s"], run.auto_approve_after_s = run.auto_approve_after_s, data.auto_approve_after_s
    if "reject_backoff" in changes:
        backoff = data.reject_backoff.model_dump(mode="json", exclude_none=True) if data.reject_backoff else None
        before["reject_backoff"], run.reject_backoff = run.reject_backoff, backoff
    run.updated_at = now
    record_event(session, run_id=run.id, kind="run.updated", actor=actor, payload={"before": before, "after": changes})
    add_feed_event(session, run.id, "run", {"change": "updated", "fields": sorted(changes)})
    return run


def heartbeat(run: Run, *, now: dt.datetime | None = None) -> None:
    run.last_heartbeat_at = now or utcnow()


def _set_tags(session: Session, run_id: int, tags: Sequence[str]) -> None:
    session.execute(delete(RunTag).where(RunTag.run_id == run_id))
    session.add_all(RunTag(run_id=run_id, tag=t) for t in dict.fromkeys(tags))
    session.flush()


def tags_of(session: Session, run_ids: Sequence[int]) -> dict[int, list[str]]:
    tags: dict[int, list[str]] = {rid: [] for rid in run_ids}
    rows = session.execute(select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(run_ids)).order_by(RunTag.tag))
    for run_id, tag in rows:
        tags[run_id].append(tag)
    return tags


def effective_status(run: Run, *, now: dt.datetime, grace: dt.timedelta) -> str:
    """*stale*: the worker says running but has not been heard from within the grace period."""
    if run.status == "running" and run.last_heartbeat_at < now - grace:
        return "stale"
    return run.status


def _filtered(query: Select[Run], flt: RunFilter, *, cutoff: dt.datetime) -> Select[Run]:
    if flt.status == "stale":
        query = query.where(and_(Run.status == "running", Run.last_heartbeat_at < cutoff))
    elif flt.status == "running":
        query = query.where(and_(Run.status == "running", Run.last_heartbeat_at >= cutoff))
    elif flt.status is not None:
        query = query.where(Run.status == flt.status)
    if flt.project is not None:
        query = query.where(Run.project == flt.project)
    if flt.tag is not None:
        query = query.where(Run.id.in_(select(RunTag.run_id).where(RunTag.tag == flt.tag)))
    if flt.name is not None:
        escaped = flt.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(or_(Run.name.ilike(f"%{escaped}%", escape="\\")))
    if flt.client_key is not None:
        query = query.where(Run.client_key == flt.client_key)
    return query


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"id": last_id}).encode()).decode()


def decode_cursor(cursor: str) -> int:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))["id"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise Invalid("cursor: not a cursor returned by this API") from exc
    # bool is an int to Python; an id past the 32-bit range would be a database error, not a 422
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise Invalid("cursor: not a cursor returned by this API")
    return value


def list_runs(
    session: Session, flt: RunFilter, *, limit: int, cursor: str | None, grace: dt.timedelta
) -> tuple[list[Run], str | None]:
    """Newest first. Keyset pagination on the id, so pages stay stable while runs are being created."""
    cutoff = utcnow() - grace
    query = _filtered(select(Run), flt, cutoff=cutoff)
    if cursor is not None:
        query = query.where(Run.id < decode_cursor(cursor))
    runs = list(session.scalars(query.order_by(Run.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(runs[limit - 1].id) if len(runs) > limit else None
    return runs[:limit], next_cursor


def latest_values(session: Session, run_ids: Sequence[int]) -> dict[int, dict[str, LatestValue]]:
    latest: dict[int, dict[str, LatestValue]] = defaultdict(dict)
    for s in session.scalars(select(Series).where(Series.run_id.in_(run_ids)).order_by(Series.key)):
        latest[s.run_id][s.key] = LatestValue(
            step=s.last_step,
            value=encode_stored_value(s.last_value) if s.last_step is not None else None,
            epoch=encode_value(s.last_epoch),
            time=s.last_time,
            count=s.point_count,
        )
    return latest


def current_stages(session: Session, run_ids: Sequence[int]) -> dict[int, CurrentStage]:
    """The open stage of each run (one query for a whole page of runs)."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Stage.run_id, Stage.index, Stage.start_step, Stage.lr).where(
            Stage.run_id.in_(run_ids), Stage.end_step.is_(None)
        )
    )
    return {run_id: CurrentStage(index=index, start_step=start, lr=lr) for run_id, index, start, lr in rows}


def to_public(session: Session, runs: Sequence[Run], *, grace: dt.timedelta) -> list[RunPublic]:
    ids = [r.id for r in runs]
    tags = tags_of(session, ids)
    latest = latest_values(session, ids)
    pending = pending_proposals(session, ids)
    stages = current_stages(session, ids)
    now = utcnow()
    return [
        RunPublic(
            id=r.id,
            client_key=r.client_key,
            name=r.name,
            project=r.project,
            tags=tags[r.id],
            notes=r.notes,
            status=effective_status(r, now=now, grace=grace),
            config=r.config,
            created_at=r.created_at,
            updated_at=r.updated_at,
            ended_at=r.ended_at,
            last_heartbeat_at=r.last_heartbeat_at,
            latest=latest.get(r.id, {}),
            mode=r.mode,
            detector=r.detector,
            auto_approve_after_s=r.auto_approve_after_s,
            reject_backoff=r.reject_backoff,
            pending_proposals=pending.get(r.id, 0),
            stage=stages.get(r.id),
        )
        for r in runs
    ]
