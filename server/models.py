"""SQLAlchemy 2 typed models: the one description of the schema that migrations must match.

Conventions:
- Metric values are stored as double precision; ``NULL`` in ``metric_points.value`` means NaN, because SQLite
  turns NaN into NULL anyway and one representation on both engines keeps queries identical. Infinities are
  stored as such by both engines.
- Wall-clock times of metric points are Unix seconds (float), as TensorBoard's ``wall_time``: they are written
  10,000 at a time and parsing datetimes there would dominate the ingest cost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite would otherwise hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One training run. ``status`` is what the worker said; *stale* is derived from the heartbeat."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The worker's idempotency key: its uniqueness is what makes concurrent creates end in one run. A unique
    # index, not a constraint, because SQLite can add an index without rebuilding the table.
    client_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200))
    project: Mapped[str] = mapped_column(String(200), index=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Live stage detection (server.live): what watches the run, and what happens to its decisions.
    mode: Mapped[str] = mapped_column(String(16), default="observe", server_default="observe")
    detector: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    auto_approve_after_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    reject_backoff: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RunTag(Base):
    __tablename__ = "run_tags"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class Series(Base):
    """One metric key of one run, with its latest value (the dashboard's runs table reads only this)."""

    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("run_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    point_count: Mapped[int] = mapped_column(BigInteger, default=0)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_value: Mapped[float | None] = mapped_column(Double, nullable=True)
    last_epoch: Mapped[float | None] = mapped_column(Double, nullable=True)
    last_time: Mapped[float | None] = mapped_column(Double, nullable=True)


# Declared here, kept on PostgreSQL by statement-level triggers instead (migration 0006): a declared key is
# checked row by row, which was more than half of PostgreSQL's ingest. Schema comparisons skip it there.
KEYS_KEPT_BY_TRIGGERS: dict[str, frozenset[str]] = {"postgresql": frozenset({"fk_metric_points_series_id_series"})}


def schema_compare_filter(dialect_name: str) -> Callable[[Any, str | None, str, bool, Any], bool]:
    """Alembic's ``include_object`` for comparing this engine's schema with the models."""
    kept = KEYS_KEPT_BY_TRIGGERS.get(dialect_name, frozenset())

    def include_object(_obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
        return not (type_ == "foreign_key_constraint" and name in kept)

    return include_object


class MetricPoint(Base):
    """A single value; the primary key (series, step) is the natural key that makes ingest idempotent."""

    __tablename__ = "metric_points"
    __table_args__ = {"sqlite_with_rowid": False}

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float | None] = mapped_column(Double, nullable=True)
    epoch: Mapped[float | None] = mapped_column(Double, nullable=True)
    time: Mapped[float] = mapped_column(Double)


class MetricRollup(Base):
    """Per-bucket summaries of a series at several step resolutions (see ``server.store.rollups``).

    They let a million-point series be downsampled by reading a few thousand rows, while the extreme
    points of every bucket (spikes, NaNs) stay exact.
    """

    __tablename__ = "metric_rollups"
    __table_args__ = {"sqlite_with_rowid": False}

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    nan_count: Mapped[int] = mapped_column(BigInteger)
    nan_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    min_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    min_value: Mapped[float | None] = mapped_column(Double, nullable=True)
    max_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_value: Mapped[float | None] = mapped_column(Double, nullable=True)


class Stage(Base):
    """A learning stage of a run: a step interval trained at one learning rate."""

    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start_step: Mapped[int] = mapped_column(BigInteger)
    end_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    source: Mapped[str] = mapped_column(String(32))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Decision(Base):
    """A proposed or commanded learning-rate change (or stop), with its evidence and lifecycle state.

    It is also the worker's durable command queue: an approved decision is a command the worker fetches
    (``delivered``) and acknowledges with the step and LR at which it applied it (``applied`` or ``failed``).
    """

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_run_id_status", "run_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))
    factor: Mapped[float | None] = mapped_column(Double, nullable=True)
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64))
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    applied_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    applied_lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    ack_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    acked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Every lifecycle transition: [{"status", "actor", "at", "note"?, ...}], oldest first.
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, server_default="[]")
    overridden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    # A rollback command carries what the worker needs in its evidence (no column of its own: it is rare).
    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """A rollback: the checkpoint to load (``id``, ``step``, ``uri``, ``stage``)."""
        found = (self.evidence or {}).get("checkpoint") if self.action == "rollback" else None
        return found if isinstance(found, dict) else None

    @property
    def rewind_event_id(self) -> int | None:
        """An applied rollback: the audit event of the rewind it made."""
        found = (self.evidence or {}).get("rewind_event_id") if self.action == "rollback" else None
        return found if isinstance(found, int) else None


class Checkpoint(Base):
    """A checkpoint the worker saved (the bytes stay in the user's storage; this is where and what it is).

    The worker integrations save one at the end of every stage -- just before an applied decay, whose decision
    it then names -- so that a person can pick an earlier-stage model (for transfer) or roll the run back to it.
    (run, step, uri) is unique: a retried report never makes a second row.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step", "uri"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(String(2000))
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the stage index it ends (or is in)
    # The decision it was saved before (the decay that ended its stage), if any.
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id", ondelete="SET NULL"), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DetectorState(Base):
    """Where live detection of a run stands: the detector's serialised state and the last points it consumed.

    Written in the same transaction as the decisions and stages it led to, so a restart resumes exactly.
    """

    __tablename__ = "detector_states"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the detector configuration this state belongs to
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # last monitored point consumed
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)  # the LR in effect, as the worker logs it
    lr_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # last LR point consumed
    hold_until_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    hold_until_epoch: Mapped[float | None] = mapped_column(Double, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FeedEvent(Base):
    """The live feed: one row per change a dashboard must see (new points, decisions, stages, run changes).

    Its id is the resume cursor of ``GET /api/v1/stream`` (Server-Sent Events ``Last-Event-ID``).
    """

    __tablename__ = "feed_events"
    __table_args__ = (Index("ix_feed_events_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Event(Base):
    """The audit log: every change to a run, who made it, and whatever is needed to undo it."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored; the token itself is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
