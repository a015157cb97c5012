"""Metrics: batch ingest, rewind, downsampled series queries and full-resolution export."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.auth import Credentials, Viewer, Worker, authorize
from server.db import transaction
from server.errors import ERROR_RESPONSES, Invalid, PayloadTooLarge, invalid_from
from server.schemas import (
    MAX_ID,
    MAX_STEP,
    CommandPublic,
    IngestResult,
    MetricKey,
    RewindList,
    RewindRequest,
    RewindResult,
    RunId,
    SeriesResult,
    metric_batch_adapter,
)
from server.state import AppState, State
from server.store import metrics as store
from server.store.batch import from_request
from server.store.commands import take_pending
from server.store.detection import forget
from server.store.export import MEDIA_TYPES, ExportFormat, export_points
from server.store.feed import add_feed_event
from server.store.runs import get_run, touch_run
from server.store.series import query_series, series_of
from server.streaming import prefetched

router = APIRouter(prefix="/api/v1/runs", tags=["metrics"], responses=ERROR_RESPONSES)

KEYS_DOC = "Metric keys (repeat the parameter); all if absent."


def _openapi_body(adapter_schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": adapter_schema}}}}


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI needs self-contained request schemas here; resolve the adapter's local ``$defs``."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


BATCH_SCHEMA = _inline_defs(metric_batch_adapter.json_schema())


def _ingest(state: AppState, run_id: int, body: bytes, credentials: HTTPAuthorizationCredentials | None) -> Response:
    authorize(state, credentials, "worker")  # first: a 401 or 403 before anything about the body
    if not body.strip():
        raise Invalid('body: expected a JSON object {"points": [...]}')
    try:
        batch = metric_batch_adapter.validate_json(body)
    except ValidationError as exc:
        raise invalid_from(exc.errors()) from None
    limit = state.settings.max_points_per_batch
    count = len(batch.get("points") or ()) + sum(len(t["keys"]) * len(t["steps"]) for t in batch.get("tables") or ())
    if count > limit:
        form = "points" if "points" in batch else "tables"
        raise PayloadTooLarge(f"{form}: {count} points in one batch, the limit is {limit}; split the batch")
    columns = from_request(batch, time.time())  # 422 for a body in neither form or a table of the wrong shape
    with transaction(state.sessions, write=True) as session:
        touch_run(session, run_id)  # the run's lock, its heartbeat, or a 404
        result = store.ingest_batch(session, run_id, columns)
        # The worker is talking to us anyway: hand it what is waiting for it.
        result.commands = [CommandPublic.model_validate(c, from_attributes=True) for c in take_pending(session, run_id)]
    # Encoded here, in the worker thread: FastAPI would validate the returned model again and encode it on the
    # event loop, which every other request waits on.
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/{run_id}/metrics", response_model=IngestResult, openapi_extra=_openapi_body(BATCH_SCHEMA))
async def ingest_metrics(run_id: RunId, request: Request, state: State, credentials: Credentials) -> Response:
    """Store a batch of points, all or nothing, in either of two forms.

    An object per point: `{"points": [{"key": "loss", "step": 10, "value": 0.5, "epoch": 0.1, "time": 1732780800.0}]}`.
    Column-wise (half the bytes, several times cheaper to check): `{"tables": [{"keys": ["loss", "lr"], "steps": [10,
    11], "values": [[0.5, 0.48], [0.1, 0.1]], "epochs": [0.1, 0.11], "times": [1732780800.0, 1732780800.2]}]}`,
    a value per key and step; `epochs` and `times` may be left out or hold nulls.
    Values may be `"NaN"`, `"Infinity"` or `"-Infinity"`. Missing times are the arrival time. Resending a stored
    point unchanged is a no-op, reported in `duplicates`; a different value for a stored (key, step) is a 409 naming
    the point (`conflicts[].where`: `points[3]`, `tables[0].values[1][5]`).
    """
    # The body is validated straight from bytes by pydantic-core: 5x faster than FastAPI's
    # parse-then-validate path, which is most of the cost of a 10,000-point batch.
    body = await request.body()
    # Its commit wakes live detection and the run's streams (server.store.changes): nothing to do here.
    # The token is checked in the same worker-thread call as the batch is stored: a `Worker` dependency would be
    # a second trip to the thread pool, ~10 % of a one-point ingest.
    return await run_in_threadpool(_ingest, state, run_id, body, credentials)


@router.post("/{run_id}/rewind", response_model=RewindResult)
def rewind_run(run_id: RunId, data: RewindRequest, state: State, who: Worker) -> RewindResult:
    """The run resumed from a checkpoint at `step`: points after it are moved to the audit log (recoverable
    at `GET /runs/{id}/events/{event_id}`) and those steps can be logged again."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        outcome = store.rewind(session, run, data.step, reason=data.reason, actor=who.actor)
        forget(session, run_id)
        add_feed_event(session, run_id, "run", {"change": "rewind", "step": data.step})
        result = RewindResult(event_id=outcome.event_id, step=data.step, removed=outcome.removed)
    return result


@router.get("/{run_id}/rewinds", response_model=RewindList)
def read_rewinds(
    run_id: RunId,
    state: State,
    _: Viewer,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="Only rewinds with a larger `event_id`.")] = 0,
) -> RewindList:
    """The run's rewinds, oldest first: step, who, why and the points removed per key. The removed points
    themselves are in the audit event (`GET /runs/{id}/events/{event_id}`)."""
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return RewindList(data=store.list_rewinds(session, run_id, after=after))


@router.get("/{run_id}/metrics", response_model=SeriesResult)
def read_metrics(
    run_id: RunId,
    state: State,
    _: Viewer,
    key: Annotated[
        list[MetricKey] | None, Query(description="Metric keys (repeat the parameter); all if absent.")
    ] = None,
    min_step: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    max_step: Annotated[int, Query(ge=0, le=MAX_STEP)] = MAX_STEP,
    max_points: Annotated[int | None, Query(ge=3, le=100_000, description="Per key.")] = None,
) -> SeriesResult:
    """Series in a step range. When a key has more than `max_points` points there, it is downsampled:
    the range is cut into buckets and each keeps its minimum and maximum point (a NaN takes the minimum's
    place), and the last point is always kept, so spikes survive."""
    if min_step > max_step:
        raise Invalid(f"min_step: {min_step} is greater than max_step {max_step}")
    limit = max_points or state.settings.default_max_points
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return SeriesResult(
            run_id=run_id,
            series=[
                query_series(session, s, min_step=min_step, max_step=max_step, max_points=limit)
                for s in series_of(session, run_id, key)
            ],
        )


@router.get(
    "/{run_id}/metrics/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Every point, as CSV, JSON lines or Parquet.",
            "content": {media.split(";")[0]: {"schema": {"type": "string"}} for media in MEDIA_TYPES.values()},
        }
    },
)
def export_metrics(
    run_id: RunId,
    state: State,
    _: Viewer,
    format: ExportFormat = "csv",
    key: Annotated[
        list[MetricKey] | None, Query(description="Metric keys (repeat the parameter); all if absent.")
    ] = None,
) -> StreamingResponse:
    """Every point at full resolution, streamed: CSV (`key,step,value,epoch,time`), JSON lines, or Parquet
    (the same columns; NaN and infinities kept as such) for pandas, polars and DuckDB."""
    with transaction(state.sessions) as session:
        get_run(session, run_id)
    return StreamingResponse(
        prefetched(export_points(state.sessions, run_id, key, format)),
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="run-{run_id}-metrics.{format}"'},
    )
