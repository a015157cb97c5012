"""Runs: create, list, read, update, heartbeat; and the run's audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from server.auth import ROLE_RANK, Viewer, Worker
from server.db import transaction
from server.errors import ERROR_RESPONSES, Forbidden, NotFound
from server.schemas import (
    NO_NUL,
    ClientKey,
    EventId,
    EventList,
    EventPublic,
    RunCreate,
    RunId,
    RunList,
    RunPublic,
    RunStatusOrStale,
    RunUpdate,
)
from server.state import State
from server.store import runs as store
from server.store.events import get_event, list_events
from server.store.runs import decode_cursor, encode_cursor

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], responses=ERROR_RESPONSES)

OPERATOR_FIELDS = frozenset({"mode", "detector", "auto_approve_after_s", "reject_backoff"})


@router.post(
    "",
    response_model=RunPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {"description": "The run was created."},
        200: {"model": RunPublic, "description": "A run with this `client_key` already existed: that run, unchanged."},
    },
)
def create_run(data: RunCreate, state: State, who: Worker, response: Response) -> RunPublic:
    """Create a run (status `running`): 201 with its `id`.

    With a `client_key` it is idempotent: if a run already has that key, the answer is 200 with that run,
    unchanged (the other fields are ignored) and nothing is recorded. Concurrent creates with one key make
    one run."""
    with transaction(state.sessions, write=True) as session:
        run, created = store.create_or_get_run(session, data, actor=who.actor)
        result = store.to_public(session, [run], grace=state.grace)[0]
    if not created:
        response.status_code = status.HTTP_200_OK
        return result
    return result


@router.get("", response_model=RunList)
def list_runs(
    state: State,
    _: Viewer,
    status_: Annotated[RunStatusOrStale | None, Query(alias="status")] = None,
    project: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    tag: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    name: Annotated[
        str | None, Query(max_length=200, pattern=NO_NUL, description="Case-insensitive substring of the run name.")
    ] = None,
    client_key: Annotated[ClientKey | None, Query(description="The run created with this key.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> RunList:
    """Runs, newest first, filtered; paginated with an opaque cursor."""
    flt = store.RunFilter(status=status_, project=project, tag=tag, name=name, client_key=client_key)
    with transaction(state.sessions) as session:
        runs, next_cursor = store.list_runs(session, flt, limit=limit, cursor=cursor, grace=state.grace)
        return RunList(data=store.to_public(session, runs, grace=state.grace), next_cursor=next_cursor)


@router.get("/{run_id}", response_model=RunPublic)
def read_run(run_id: RunId, state: State, _: Viewer) -> RunPublic:
    with transaction(state.sessions) as session:
        return store.to_public(session, [store.get_run(session, run_id)], grace=state.grace)[0]


@router.patch("/{run_id}", response_model=RunPublic)
def update_run(run_id: RunId, data: RunUpdate, state: State, who: Worker) -> RunPublic:
    """Change name, tags, notes or status (`running`, `finished`, `failed`); with the operator role also the
    live-detection settings (`mode`, `detector`, `auto_approve_after_s`, `reject_backoff`). Every change is
    audited. A run that ends expires the proposals still waiting; a new `detector` is rebuilt from the
    stored points and decides on new ones only."""
    operator_fields = sorted(data.model_fields_set & OPERATOR_FIELDS)
    if operator_fields and ROLE_RANK[who.role] < ROLE_RANK["operator"]:
        raise Forbidden(f"changing {', '.join(operator_fields)} needs the operator role; the token has {who.role}")
    with transaction(state.sessions, write=True) as session:
        run = store.update_run(session, store.get_run(session, run_id, for_update=True), data, actor=who.actor)
        result = store.to_public(session, [run], grace=state.grace)[0]
    return result


@router.post("/{run_id}/heartbeat", response_model=RunPublic)
def post_heartbeat(run_id: RunId, state: State, _: Worker) -> RunPublic:
    """Tell the server the worker is alive. Ingesting metrics counts as a heartbeat too."""
    with transaction(state.sessions, write=True) as session:
        run = store.get_run(session, run_id, for_update=True)
        store.heartbeat(run)
        return store.to_public(session, [run], grace=state.grace)[0]


@router.get("/{run_id}/events", response_model=EventList)
def read_events(
    run_id: RunId,
    state: State,
    _: Viewer,
    kind: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> EventList:
    """The run's audit log, newest first."""
    with transaction(state.sessions) as session:
        store.get_run(session, run_id)
        before = decode_cursor(cursor) if cursor else None
        events = list_events(session, run_id, kind=kind, before_id=before, limit=limit + 1)
        next_cursor = encode_cursor(events[limit - 1].id) if len(events) > limit else None
        return EventList(
            data=[EventPublic.model_validate(e, from_attributes=True) for e in events[:limit]],
            next_cursor=next_cursor,
        )


@router.get("/{run_id}/events/{event_id}", response_model=EventPublic)
def read_event(run_id: RunId, event_id: EventId, state: State, _: Viewer) -> EventPublic:
    """One audit event in full, e.g. a rewind with the points it replaced."""
    with transaction(state.sessions) as session:
        store.get_run(session, run_id)
        event = get_event(session, run_id, event_id)
        if event is None:
            raise NotFound(f"run {run_id} has no event {event_id}")
        return EventPublic.model_validate(event, from_attributes=True)
