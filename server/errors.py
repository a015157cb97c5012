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

log = logging.getLogger(__name__)


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


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"field": format_location(e["loc"]), "message": e["msg"], "type": e["type"]} for e in errors]


def invalid_from(errors: Sequence[Any]) -> Invalid:
    items = validation_errors(errors)
    first = items[0] if items else {"field": "body", "message": "invalid"}
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return Invalid(f"{first['field']}: {first['message']}{more}", extra={"errors": items[:20]})


def error_body(exc: StagewatchError) -> dict[str, Any]:
    return {"detail": exc.detail, "code": exc.code, **exc.extra}


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
        body = {"detail": detail, "code": f"http_{exc.status_code}"}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        body = {"detail": "internal error; see the server log", "code": "internal"}
        return JSONResponse(body, status_code=500)
