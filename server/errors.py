"""Domain errors, and the one place where every error becomes a JSON response.

Every error body has the same shape: ``{"detail": "<sentence naming what was wrong>", "code": "<slug>"}``,
plus ``errors`` (one entry per invalid field) for validation failures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.limits import TrackedSend
from server.schemas import ErrorBody

log = logging.getLogger(__name__)

_ERROR_STATUSES = {
    400: "The body is not valid JSON.",
    401: "Missing, invalid or revoked token.",
    403: "The token's role does not allow this.",
    404: "No such run, decision, command or event.",
    409: "Conflicts with what is stored (the message says what).",
    413: "The body or batch is over the limit.",
    415: "The body is not JSON (`Content-Type: application/json`).",
    422: "A field, parameter or body is invalid (the message names it).",
}
# Declared on every API router, so that the OpenAPI document describes the bodies the server really sends
# (FastAPI's default 422 schema is not ours).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _ERROR_STATUSES.items()
}


class StagewatchError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


class NotFound(StagewatchError):
    status_code = 404
    code = "not_found"


class Conflict(StagewatchError):
    status_code = 409
    code = "conflict"


class Invalid(StagewatchError):
    status_code = 422
    code = "invalid"


class PayloadTooLarge(StagewatchError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(StagewatchError):
    status_code = 401
    code = "unauthorized"


class Forbidden(StagewatchError):
    status_code = 403
    code = "forbidden"


def run_not_found(run_id: int) -> NotFound:
    return NotFound(f"run {run_id} does not exist")


def format_location(loc: Iterable[Any]) -> str:
    """``("body", "points", 3, "value")`` -> ``points[3].value``."""
    text = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not text:
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


# A metric value is a number or one of three strings (server.schemas.MetricValue): pydantic reports one error per
# alternative, each under the alternative's name; the client needs one, under the field's.
_VALUE_ALTERNATIVES = frozenset({"float", "literal['NaN','Infinity','-Infinity']"})
_VALUE_MESSAGE = "Input should be a finite number, or 'NaN', 'Infinity' or '-Infinity' as a string"


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    values_seen: set[tuple[Any, ...]] = set()
    for e in errors:
        loc = tuple(e["loc"])
        if loc and loc[-1] in _VALUE_ALTERNATIVES:
            if loc[:-1] not in values_seen:
                values_seen.add(loc[:-1])
                items.append({"field": format_location(loc[:-1]), "message": _VALUE_MESSAGE, "type": "metric_value"})
            continue
        items.append({"field": format_location(loc), "message": e["msg"], "type": e["type"]})
    return items


def invalid_from(errors: Sequence[Any]) -> Invalid:
    items = validation_errors(errors)
    first = items[0] if items else {"field": "body", "message": "invalid"}
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return Invalid(f"{first['field']}: {first['message']}{more}", extra={"errors": items[:20]})


def error_body(exc: StagewatchError) -> dict[str, Any]:
    return {"detail": exc.detail, "code": exc.code, **exc.extra}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers on this path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StagewatchError)
    async def _domain(_: Request, exc: StagewatchError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = invalid_from(exc.errors())
        return JSONResponse(error_body(err), status_code=422)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        err = invalid_from(exc.errors())
        return JSONResponse(error_body(err), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such path: {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
            # Starlette names only the methods of the first route with this path; the others count too.
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
            return JSONResponse({"detail": detail, "code": "http_405"}, status_code=405, headers=headers)
        elif exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "body: not valid JSON"
        body = {"detail": detail, "code": f"http_{exc.status_code}"}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


class InternalErrors:
    """A bug becomes a JSON 500 and the connection stays open.

    Starlette's outermost error middleware re-raises after answering (so servers can log), and uvicorn then
    closes the connection: the client's next request on it fails too. Here the error is logged and answered
    and goes no further. Only a response already under way (a stream) must still break its connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if tracked.started:
                raise
            body = {"detail": "internal error; see the server log", "code": "internal"}
            await JSONResponse(body, status_code=500)(scope, receive, send)
