"""The metrics ingest, ``POST /api/v1/runs/{run_id}/metrics``, answered without FastAPI's per-request machinery.

Why: a worker that logs synchronously (one point, one request) waits for the whole request, and on a one-point
batch FastAPI's dependency resolution, its route wrappers and a route table scanned in order cost about as
much CPU as storing the point. This route sits first in the app's table and does exactly what
:func:`server.routes.metrics.ingest_metrics` does -- the same bearer parsing, the same worker-thread call
(:func:`server.routes.metrics._ingest`: auth, strict validation of the body, the transaction) -- so answers,
errors and headers are the same. Exceptions reach the app's handlers (``server.errors``) as from any route.

It only takes what it handles identically: a POST whose run id is a decimal in range. Anything else (a bad id,
another method) falls through to the FastAPI route, which stays the documented one (OpenAPI) and gives those
requests their usual answers (422 naming ``run_id``, 405 with ``Allow``).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from server.auth import bearer
from server.routes.metrics import _ingest
from server.schemas import MAX_ID
from server.state import AppState

__all__ = ["IngestRoute"]

PATH = "/api/v1/runs/{run_id:int}/metrics"


async def _endpoint(request: Request) -> Response:
    state: AppState = request.app.state.stagewatch
    credentials = await bearer(request)  # None when absent or not a bearer token (auto_error=False)
    body = await request.body()
    return await run_in_threadpool(_ingest, state, request.path_params["run_id"], body, credentials)


class IngestRoute(Route):
    """See the module doc. Not in the OpenAPI document: the FastAPI route documents the same path."""

    def __init__(self) -> None:
        super().__init__(PATH, _endpoint, methods=["POST"], include_in_schema=False, name="ingest_metrics_fast")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.FULL or not 1 <= child["path_params"]["run_id"] <= MAX_ID:
            return Match.NONE, {}  # the FastAPI route answers it, as it always did
        return match, child
