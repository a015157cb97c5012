"""Pydantic request and response models of REST v1, named by role (``RunCreate``, ``RunPublic``...)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal, NotRequired

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

RunStatus = Literal["running", "finished", "failed"]
RunStatusOrStale = Literal["running", "finished", "failed", "stale"]
Role = Literal["viewer", "worker", "operator"]

# --- bounds: every number and string that reaches the database is bounded here, at the edge -----------------
# A value the database cannot hold would be a 500 at best; at worst it is stored and breaks every later reader
# (an event whose step is 1e20 cannot be encoded, and kills each stream that reaches it).

MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL; past this no row can exist
MAX_STEP = 2**62  # steps are 64-bit; headroom for step arithmetic (rollup buckets, +1 cursors)
MAX_SPAN_STEPS = 2**61  # a hold or backoff: step + span must still fit in 64 bits
MAX_FEED_ID = 2**62  # live-event ids are 64-bit
MAX_SECONDS = 10 * 365 * 86_400.0  # durations: ten years is "never" for any training run
MAX_EPOCHS = 1e6
MAX_LR = 1e6  # a learning rate; far beyond any that trains

# PostgreSQL text cannot hold NUL: refused in every string, on both engines, so they store the same things.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
Tag = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\s,\x00]+$")]
MetricKey = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
Reason = Annotated[str, Field(max_length=2000, pattern=NO_NUL)]
# Chosen by the worker to make run creation idempotent. Control characters (NUL above all) are refused so
# that the key is stored and matched byte for byte on both engines.
ClientKey = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
# Integers are strict: "12", true and 3.0 are not steps.
Step = Annotated[int, Field(strict=True, ge=0, le=MAX_STEP)]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="A run's id.")]
DecisionId = Annotated[int, Path(ge=1, le=MAX_ID, description="A decision's id.")]
CommandId = Annotated[int, Path(ge=1, le=MAX_ID, description="A command's id.")]
EventId = Annotated[int, Path(ge=1, le=MAX_ID, description="An audit event's id.")]

NON_FINITE_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
}
# JSON has no NaN or infinities; they travel as these strings in both directions (decoded by
# ``decode_value``). Numbers are strict: true, "12" and 1e309 (an overflow to infinity) are refused.
NonFiniteName = Literal["NaN", "Infinity", "-Infinity"]
MetricValue = Annotated[
    Annotated[float, Field(strict=True, allow_inf_nan=False)] | NonFiniteName, WithJsonSchema(NON_FINITE_SCHEMA)
]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NON_FINITE: dict[str, float | None] = {"NaN": None, "Infinity": math.inf, "-Infinity": -math.inf}


def decode_value(value: float | str) -> float | None:
    """A metric value as stored: the non-finite names become floats, NaN becomes None (see ``server.models``)."""
    return NON_FINITE[value] if isinstance(value, str) else value


EncodedValue = Annotated[float | str | None, WithJsonSchema({"anyOf": [*NON_FINITE_SCHEMA["anyOf"], {"type": "null"}]})]


def encode_value(value: float | None) -> float | str | None:
    """A float as JSON can carry it: non-finite values become "NaN", "Infinity" or "-Infinity"."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def encode_stored_value(value: float | None) -> float | str:
    """A stored metric value: NULL in the table stands for NaN (see ``server.models``)."""
    encoded = encode_value(value)
    return "NaN" if encoded is None else encoded


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(BaseModel):
    field: str = Field(description="Where, e.g. `points[3].value`.")
    message: str
    type: str


class ErrorBody(BaseModel):
    """Every error the API answers with."""

    detail: str = Field(description="A sentence naming what was wrong.")
    code: str = Field(description="A stable slug: `invalid`, `not_found`, `conflict`, `unauthorized`...")
    errors: list[FieldError] | None = Field(default=None, description="Validation errors: one per invalid field.")


# --- runs -------------------------------------------------------------------------------------------------


def _storable_json(value: Any, path: str = "config") -> Any:
    """Stored JSON must be renderable again, on both engines: JSON has no NaN (Python's parser lets it in),
    the encoders stop at 64-bit integers, and PostgreSQL cannot hold NUL."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} holds {value}, which JSON cannot represent; send it as a string")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"{path} holds an integer outside the 64-bit range; send it as a string")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{path} holds a NUL character")
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                raise ValueError(f"{path} has a key with a NUL character")
            _storable_json(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _storable_json(v, f"{path}[{i}]")
    return value


FiniteJson = Annotated[dict[str, Any], AfterValidator(_storable_json)]


# --- live detection configuration ---------------------------------------------------------------------

Mode = Literal["auto", "approve", "observe"]


class DetectorConfig(Strict):
    """Which detector watches a run, on which metric key, with which parameters."""

    name: Annotated[str, Field(max_length=100, pattern=NO_NUL)] = Field(
        description="A detector of `stagewatch replay --help`: autodecay, plateau, slope, stationarity."
    )
    metric: MetricKey = Field(default="epoch/train_loss", description="The metric key the detector is fed.")
    params: FiniteJson = Field(default_factory=dict, description="The detector's parameters; unknown ones refused.")
    lr_key: MetricKey = Field(default="lr", description="The metric key holding the LR in effect (stages follow it).")

    @model_validator(mode="after")
    def _known_detector(self) -> DetectorConfig:
        # Imported here: the detectors package imports nothing from the schemas, but keep the import graph flat.
        from server.detectors import DetectorError, make_detector

        try:
            make_detector(self.name, self.params)
        except DetectorError as exc:
            raise ValueError(str(exc)) from exc
        return self


class Span(Strict):
    """A number of epochs or of steps (exactly one), counted from the point where it starts."""

    epochs: float | None = Field(default=None, gt=0, le=MAX_EPOCHS, allow_inf_nan=False, strict=True)
    steps: int | None = Field(default=None, gt=0, le=MAX_SPAN_STEPS, strict=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> Span:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs and steps")
        return self


class RunCreate(Strict):
    client_key: ClientKey | None = Field(
        default=None,
        description="Makes creation idempotent: if a run already has this key, that run is returned (200) "
        "unchanged and the other fields are ignored.",
    )
    name: Name | None = Field(default=None, description="Defaults to `run-<id>`.")
    project: Name = "default"
    tags: list[Tag] = Field(default_factory=list, max_length=50)
    notes: str = Field(default="", max_length=20_000, pattern=NO_NUL)
    config: FiniteJson = Field(default_factory=dict, description="Hyperparameters, free-form JSON.")
    mode: Mode = Field(
        default="observe",
        description="auto: the detector's decisions are applied at once; approve: they wait for an operator; "
        "observe: they are only recorded and drawn.",
    )
    detector: DetectorConfig | None = Field(default=None, description="Live stage detection; none by default.")
    auto_approve_after_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        strict=True,
        description="approve mode: approve a proposal nobody decided on.",
    )
    reject_backoff: Span | None = Field(
        default=None, description="After a rejection the detector is held this long (default: not held)."
    )


def _not_null(schema: dict[str, Any]) -> None:
    """An optional field that may be left out but not sent as null: the schema says so (the store refuses it)."""
    schema.pop("default", None)
    options = [s for s in schema.pop("anyOf", []) if s != {"type": "null"}]
    if len(options) == 1:
        schema.update(options[0])
    elif options:
        schema["anyOf"] = options


class RunUpdate(Strict):
    """Only the fields sent are changed."""

    name: Name | None = Field(default=None, json_schema_extra=_not_null)
    tags: list[Tag] | None = Field(default=None, max_length=50)
    notes: str | None = Field(default=None, max_length=20_000, pattern=NO_NUL)
    status: RunStatus | None = Field(
        default=None, description="`stale` is derived from heartbeats and cannot be set.", json_schema_extra=_not_null
    )
    mode: Mode | None = Field(default=None, json_schema_extra=_not_null)
    detector: DetectorConfig | None = Field(default=None, description="null turns live detection off.")
    auto_approve_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS, allow_inf_nan=False, strict=True)
    reject_backoff: Span | None = None


class LatestValue(BaseModel):
    step: int | None
    value: EncodedValue
    epoch: EncodedValue = None
    time: float | None = None
    count: int


class CurrentStage(BaseModel):
    index: int
    start_step: int
    lr: float | None


class RunPublic(BaseModel):
    id: int
    client_key: str | None = Field(description="The key the run was created with, if any.")
    name: str
    project: str
    tags: list[str]
    notes: str
    status: RunStatusOrStale
    config: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    ended_at: dt.datetime | None
    last_heartbeat_at: dt.datetime
    latest: dict[str, LatestValue] = Field(description="Latest value of each metric key.")
    mode: Mode
    detector: DetectorConfig | None
    auto_approve_after_s: float | None
    reject_backoff: Span | None
    pending_proposals: int = Field(description="Proposals waiting for an operator.")
    stage: CurrentStage | None = Field(description="The open stage, once live detection has seen an LR or a point.")


class RunList(BaseModel):
    data: list[RunPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last.")


# --- metrics ----------------------------------------------------------------------------------------------


Epoch = Annotated[FiniteFloat, Field(ge=0)]
PointTime = Annotated[FiniteFloat, Field(description="Unix seconds; defaults to arrival time.")]


@with_config(ConfigDict(extra="forbid"))
class PointIn(TypedDict):
    """One metric point as sent by a worker. A TypedDict, not a model: validation is 5x faster."""

    key: MetricKey
    step: Step
    value: MetricValue
    epoch: NotRequired[Epoch | None]
    time: NotRequired[PointTime | None]


@with_config(ConfigDict(extra="forbid"))
class TableIn(TypedDict):
    """Points column-wise: one row per step, a value per key. What a training loop logs (the same keys, step
    after step) without repeating each key and time per point: half the bytes of the ``points`` form, and
    validated about 6x faster."""

    keys: Annotated[list[MetricKey], Field(min_length=1, description="Distinct metric keys.")]
    steps: Annotated[list[Step], Field(description="One step per row.")]
    values: Annotated[
        list[list[MetricValue]], Field(description="One list per key, in the order of `keys`, a value per step.")
    ]
    epochs: NotRequired[Annotated[list[Epoch | None] | None, Field(description="One per step, if given.")]]
    times: NotRequired[Annotated[list[PointTime | None] | None, Field(description="One per step, if given.")]]


@with_config(ConfigDict(extra="forbid"))
class MetricBatch(TypedDict):
    """Exactly one of the two forms: ``points`` (one object per point) or ``tables`` (column-wise)."""

    points: NotRequired[list[PointIn]]
    tables: NotRequired[list[TableIn]]


metric_batch_adapter: TypeAdapter[MetricBatch] = TypeAdapter(MetricBatch)


class IngestResult(BaseModel):
    accepted: int = Field(description="Points in the request.")
    inserted: int = Field(description="Points stored by this request.")
    duplicates: int = Field(description="Points already stored with the same value (resends); a no-op.")
    commands: list[CommandPublic] = Field(
        default_factory=list, description="Commands waiting for this run's worker (now marked delivered)."
    )


class RewindRequest(Strict):
    step: Step = Field(
        description="The checkpoint's step: points after it are moved to the audit log and may be re-sent."
    )
    reason: Reason = ""


class RewindResult(BaseModel):
    event_id: int
    step: int
    removed: dict[str, int] = Field(description="Points moved to the audit log, per key.")


class RewindPublic(BaseModel):
    event_id: int = Field(description="The `metrics.rewound` audit event, with the archived points.")
    step: int
    time: dt.datetime
    actor: str
    reason: str
    removed: dict[str, int] = Field(description="Points moved to the audit log, per key.")


class RewindList(BaseModel):
    data: list[RewindPublic] = Field(description="Oldest first.")


class SeriesOut(BaseModel):
    key: str
    steps: list[int]
    values: list[EncodedValue]
    epochs: list[EncodedValue]
    times: list[float | None]
    total_points: int = Field(description="Points stored in the requested step range.")
    downsampled: bool


class SeriesResult(BaseModel):
    run_id: int
    series: list[SeriesOut]


# --- stages and decisions ---------------------------------------------------------------------------------


class StagePublic(BaseModel):
    index: int
    start_step: int
    end_step: int | None
    lr: float | None
    source: str
    summary: dict[str, Any]


DecisionStatus = Literal[
    "proposed",
    "approved",
    "rejected",
    "expired",
    "superseded",
    "observed",
    "delivered",
    "applied",
    "failed",
    "rolled_back",
]


class Transition(BaseModel):
    """One lifecycle step; some carry more (``overrides``: what was proposed; ``step``/``lr``: the worker's ack)."""

    model_config = ConfigDict(extra="allow")

    status: str
    actor: str
    at: dt.datetime
    note: str = ""


class DecisionPublic(BaseModel):
    """A decision and its whole lifecycle: proposed -> approved / rejected / expired / superseded (or observed)
    -> delivered -> applied / failed. ``factor``/``lr`` are what is (to be) applied; an override changes them
    and sets ``overridden``."""

    id: int
    run_id: int
    action: str
    factor: float | None
    lr: float | None
    step: int | None = Field(description="The step of the point that completed the evidence.")
    status: DecisionStatus
    source: str = Field(description="`detector:<name>` or `operator`.")
    evidence: dict[str, Any]
    actor: str
    reason: str
    overridden: bool
    applied_step: int | None
    applied_lr: float | None
    history: list[Transition]
    created_at: dt.datetime
    updated_at: dt.datetime
    auto_approve_at: dt.datetime | None = Field(
        default=None,
        description="A waiting proposal of an approve-mode run with `auto_approve_after_s`: when it will be approved "
        "if nobody decides first (approving, rejecting or overriding before then wins).",
    )


class DecideRequest(Strict):
    reason: Reason = ""


class RejectRequest(DecideRequest):
    backoff: Span | None = Field(default=None, description="Hold the detector this long (default: the run's).")


class OverrideRequest(DecideRequest):
    factor: float | None = Field(default=None, gt=0, lt=1, strict=True, description="Decay by this factor instead.")
    lr: float | None = Field(
        default=None, gt=0, le=MAX_LR, allow_inf_nan=False, strict=True, description="Or set this LR instead."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> OverrideRequest:
        if (self.factor is None) == (self.lr is None):
            raise ValueError("give exactly one of factor and lr")
        return self


class HoldRequest(Span):
    reason: Reason = ""


class DetectionProgress(BaseModel):
    """How far live detection has got on a run's stored points."""

    run_id: int
    metric: str | None = Field(description="The monitored key; null when the run has no detector.")
    lr_key: str
    through_step: int | None = Field(description="The last monitored point detection has examined.")
    lr_through_step: int | None = Field(description="The last LR point the stages have followed.")
    stored_through_step: int | None = Field(description="The last monitored point stored.")
    lr_stored_through_step: int | None = Field(description="The last LR point stored.")
    fed_through_step: int | None = Field(
        description="The last monitored point the detector itself consumed; behind `through_step` while it waits "
        "for the outcome of `waiting_on`."
    )
    waiting_on: int | None = Field(description="The decision whose outcome the detector waits for (nothing is fed).")
    caught_up: bool = Field(description="Every stored point has been examined.")


class HoldPublic(BaseModel):
    run_id: int
    hold_until_step: int | None
    hold_until_epoch: float | None


# --- commands ---------------------------------------------------------------------------------------------

CommandAction = Literal["decay", "set_lr", "stop"]
# What the worker may be sent: the operator's commands, and a rollback (POST /runs/{id}/rollback).
CommandKind = Literal["decay", "set_lr", "stop", "rollback"]
CommandStatus = Literal["approved", "delivered", "applied", "failed"]


class CommandCreate(Strict):
    action: CommandAction
    factor: float | None = Field(
        default=None, gt=0, lt=1, strict=True, description="decay: the LR is multiplied by this."
    )
    lr: float | None = Field(
        default=None, gt=0, le=MAX_LR, allow_inf_nan=False, strict=True, description="set_lr: the new LR."
    )
    reason: Reason = ""

    @model_validator(mode="after")
    def _fields_match_action(self) -> CommandCreate:
        wanted = {"decay": ("factor",), "set_lr": ("lr",), "stop": ()}[self.action]
        for name in ("factor", "lr"):
            given = getattr(self, name) is not None
            if given and name not in wanted:
                raise ValueError(f"{name} does not apply to a {self.action} command")
            if not given and name in wanted:
                raise ValueError(f"a {self.action} command needs {name}")
        return self


class CheckpointRef(BaseModel):
    """The checkpoint a rollback command loads: the worker reads it from ``uri`` and continues from ``step``."""

    id: int
    step: int
    uri: str
    stage: int | None = None


class CommandPublic(BaseModel):
    id: int
    action: CommandKind
    factor: float | None
    lr: float | None
    status: str
    reason: str
    actor: str
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    acked_at: dt.datetime | None
    applied_step: int | None
    applied_lr: float | None
    ack_message: str | None
    checkpoint: CheckpointRef | None = Field(default=None, description="rollback: the checkpoint to load.")
    rewind_event_id: int | None = Field(
        default=None, description="An applied rollback: the audit event that holds the points it rewound."
    )


class CommandList(BaseModel):
    data: list[CommandPublic]


class CommandAck(Strict):
    status: Literal["applied", "failed"]
    step: Step = Field(description="The step boundary at which the worker applied it.")
    lr: float | None = Field(
        default=None, ge=0, le=MAX_LR, allow_inf_nan=False, strict=True, description="The LR now in effect."
    )
    message: Reason = ""
    checkpoint: CheckpointCreate | None = Field(
        default=None,
        description="A checkpoint the worker saved just before applying it (the end of the stage a decay ends): "
        "recorded as if posted to `POST /runs/{id}/checkpoints`, naming this command as its decision.",
    )


# --- checkpoints and rollback -----------------------------------------------------------------------------

CheckpointMetrics = Annotated[dict[MetricKey, MetricValue], Field(max_length=100)]


class CheckpointCreate(Strict):
    """A checkpoint the worker saved: where it is (a path or URI in the user's storage) and what it was like."""

    step: Step = Field(description="The step the checkpoint holds the state after.")
    uri: str = Field(min_length=1, max_length=2000, pattern=r"^[^\x00-\x1f\x7f]+$", description="Path or URI.")
    stage: int | None = Field(default=None, ge=0, le=MAX_ID, strict=True, description="The stage index it ends.")
    decision_id: int | None = Field(
        default=None, ge=1, le=MAX_ID, strict=True, description="The decision it was saved just before."
    )
    lr: float | None = Field(default=None, ge=0, le=MAX_LR, allow_inf_nan=False, strict=True)
    metrics: CheckpointMetrics = Field(default_factory=dict, description="Latest metric values, free keys.")


class CheckpointPublic(BaseModel):
    id: int
    run_id: int
    step: int
    uri: str
    stage: int | None
    decision_id: int | None
    lr: float | None
    metrics: dict[str, EncodedValue]
    actor: str
    created_at: dt.datetime


class CheckpointList(BaseModel):
    data: list[CheckpointPublic]


class RollbackRequest(Strict):
    checkpoint_id: int = Field(ge=1, le=MAX_ID, strict=True, description="The run's checkpoint to roll back to.")
    backoff: Span | None = Field(
        default=None,
        description="Hold the detector for this many epochs or steps after the checkpoint (default: the run's "
        "`reject_backoff`), so that it does not propose the same decay again at once.",
    )
    reason: Reason = ""


# --- audit log, tokens, health ----------------------------------------------------------------------------


class EventPublic(BaseModel):
    id: int
    run_id: int | None
    kind: str
    actor: str
    payload: dict[str, Any]
    created_at: dt.datetime


class EventList(BaseModel):
    data: list[EventPublic]
    next_cursor: str | None


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    database: str
    schema_revision: str | None
