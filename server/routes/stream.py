"""Live events over Server-Sent Events, resumable: nothing is missed across a reconnect.

Each event carries its feed id as the SSE ``id``; a browser's ``EventSource`` sends the last one back as
``Last-Event-ID`` when it reconnects, and the stream goes on right after it (``after`` does the same for other
clients). Without either, the stream starts with what happens from now on. The first message is ``hello``
with the current cursor, so a client can subscribe first, then load the state it draws, then apply events.

Event kinds: ``points`` (keys and step ranges of a committed batch; small batches carry their points as
``[step, value, epoch, wall time]``),
``decision`` (a decision after any transition), ``stage`` (a stage opened, closed or updated), ``run``
(created, updated, rewound, held); ``error`` in place of a stored event that cannot be encoded (the stream goes on
past it), and ``revoked``, the last event of a stream whose token has been revoked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from server.auth import Principal, bearer, require
from server.db import transaction
from server.errors import ERROR_RESPONSES, Invalid
from server.models import FeedEvent
from server.schemas import MAX_FEED_ID, RunId
from server.state import ALL_RUNS, AppState, State
from server.store.feed import FeedCursor, last_feed_id
from server.store.runs import get_run
from server.store.tokens import token_is_active

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["live events"], responses=ERROR_RESPONSES)

KEEPALIVE_S = 15.0
RECHECK_S = 2.0  # a fallback: other server processes wake us through PostgreSQL (server.replicas); look anyway
BATCH = 500


def _viewer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[str | None, Query(description="A viewer token, for clients that cannot set headers.")] = None,
) -> Principal:
    """A browser's EventSource cannot send an Authorization header; it may pass ``?token=`` instead."""
    if credentials is None and token is not None:
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    check = require("viewer")
    return check(request, credentials)


Viewer = Annotated[Principal, Depends(_viewer)]


def _cursor(after: int | None, last_event_id: str | None) -> int | None:
    if last_event_id:
        digits = last_event_id.isascii() and last_event_id.isdigit() and len(last_event_id) <= 19
        if not (digits and int(last_event_id) <= MAX_FEED_ID):
            raise Invalid(f"Last-Event-ID: expected an event id (0 to {MAX_FEED_ID}), got {last_event_id[:40]!r}")
        return int(last_event_id)
    return after


def _message(event: FeedEvent) -> bytes:
    try:
        data = orjson.dumps({"run_id": event.run_id, **event.payload})
        kind = event.kind.encode()
    except (TypeError, UnicodeEncodeError):
        # Inputs are bounded so that every event encodes; should one still not, its id must pass, or every
        # stream that reaches it (and every reconnect after it) would die on it.
        logger.exception("live event %d of run %s cannot be encoded; sent as an error event", event.id, event.run_id)
        data, kind = orjson.dumps({"run_id": event.run_id, "detail": "this event could not be encoded"}), b"error"
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, kind, data)


def _read(state: AppState, cursor: FeedCursor, run_id: int | None, token_id: int | None) -> list[bytes] | None:
    """The next events, or None once the stream's token has been revoked."""
    with transaction(state.sessions) as session:
        if token_id is not None and not token_is_active(session, token_id):
            return None
        return [_message(e) for e in cursor.read(session, run_id=run_id, limit=BATCH)]


def _start(state: AppState, run_id: int | None) -> int:
    with transaction(state.sessions) as session:
        if run_id is not None:
            get_run(session, run_id)
        return last_feed_id(session)


async def _events(
    state: AppState, request: Request, run_id: int | None, cursor: int, token_id: int | None
) -> AsyncIterator[bytes]:
    key = ALL_RUNS if run_id is None else run_id
    signal = state.feed.subscribe(key)
    try:
        hello = orjson.dumps({"cursor": cursor, "run_id": run_id})
        yield b"retry: 1000\nid: %d\nevent: hello\ndata: %s\n\n" % (cursor, hello)
        quiet = 0.0
        feed = FeedCursor(cursor)
        while not await request.is_disconnected():
            signal.clear()  # before reading: a commit after the read still wakes the wait below
            messages = await run_in_threadpool(_read, state, feed, run_id, token_id)
            if messages is None:  # checked at every read, and at least every RECHECK_S
                yield b'id: %d\nevent: revoked\ndata: {"detail": "the token was revoked"}\n\n' % feed.after
                return
            if messages:
                quiet = 0.0
                for message in messages:
                    yield message
                if len(messages) == BATCH:
                    continue
            recheck = state.settings.recheck_s or RECHECK_S
            try:
                await asyncio.wait_for(signal.wait(), recheck)
            except TimeoutError:
                quiet += recheck
                if quiet >= KEEPALIVE_S:  # keeps proxies from closing an idle stream
                    quiet = 0.0
                    yield b": keepalive\n\n"
    finally:
        state.feed.unsubscribe(key, signal)


def _response(state: AppState, request: Request, run_id: int | None, cursor: int, who: Principal) -> StreamingResponse:
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    events = _events(state, request, run_id, cursor, who.token_id)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-sent events.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
}


@router.get("/stream", response_class=StreamingResponse, responses=SSE_RESPONSE)
async def stream_all(
    request: Request,
    state: State,
    who: Viewer,
    after: Annotated[int | None, Query(ge=0, le=MAX_FEED_ID, description="Resume after this event id.")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Live events of every run (the runs page)."""
    cursor = _cursor(after, last_event_id)
    if cursor is None:
        cursor = await run_in_threadpool(_start, state, None)
    return _response(state, request, None, cursor, who)


@router.get("/runs/{run_id}/stream", response_class=StreamingResponse, responses=SSE_RESPONSE)
async def stream_run(
    run_id: RunId,
    request: Request,
    state: State,
    who: Viewer,
    after: Annotated[int | None, Query(ge=0, le=MAX_FEED_ID, description="Resume after this event id.")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Live events of one run (its page)."""
    cursor = _cursor(after, last_event_id)
    start = await run_in_threadpool(_start, state, run_id)  # also 404 for an unknown run
    return _response(state, request, run_id, start if cursor is None else cursor, who)
