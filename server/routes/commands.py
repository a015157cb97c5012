"""Commands for a run's worker: an operator queues one, the worker fetches (long-poll) and acknowledges it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Query, status
from starlette.concurrency import run_in_threadpool

from server.auth import Operator, Worker
from server.db import transaction
from server.errors import ERROR_RESPONSES
from server.schemas import MAX_ID, CommandAck, CommandCreate, CommandId, CommandList, CommandPublic, RunId
from server.state import AppState, State
from server.store import commands as store
from server.store.runs import get_run

router = APIRouter(prefix="/api/v1/runs", tags=["commands"], responses=ERROR_RESPONSES)

# Long-polls are woken at once by commands committed in this process, or another one on PostgreSQL
# (server.replicas); this re-check is the fallback.
RECHECK_S = 1.0


def public(command: object) -> CommandPublic:
    return CommandPublic.model_validate(command, from_attributes=True)


@router.post("/{run_id}/commands", response_model=CommandPublic, status_code=status.HTTP_201_CREATED)
def create_command(run_id: RunId, data: CommandCreate, state: State, who: Operator) -> CommandPublic:
    """Queue a command for the run's worker: `decay` (by `factor`), `set_lr` (to `lr`) or `stop`."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        command = store.create_command(session, run, data, actor=who.actor)  # supersedes what was waiting
        result = public(command)
    return result


def _take(state: AppState, run_id: int, after: int) -> tuple[list[CommandPublic], bool]:
    """The pending commands, and whether the run is still running."""
    with transaction(state.sessions, write=True) as session:
        # The run row first, as every writer of a run does: otherwise Postgres can deadlock with an ingest.
        run = get_run(session, run_id, for_update=True)
        return [public(c) for c in store.take_pending(session, run_id, after=after)], run.status == "running"


@router.get("/{run_id}/commands", response_model=CommandList)
async def fetch_commands(
    run_id: RunId,
    state: State,
    _: Worker,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="Only commands with a larger id.")] = 0,
    wait: Annotated[float, Query(ge=0, le=30, description="Long-poll up to this many seconds.")] = 0,
) -> CommandList:
    """Commands not yet acknowledged, oldest first; fetching marks them delivered. With `wait`, the request
    is held until one exists, the run ends (its worker closed it: nothing more will come) or `wait` seconds
    pass."""
    deadline = time.monotonic() + wait
    signal = state.wakeups.subscribe(run_id)
    try:
        while True:
            signal.clear()  # before reading: a command committed after the read still wakes the wait
            commands, running = await run_in_threadpool(_take, state, run_id, after)
            remaining = deadline - time.monotonic()
            if commands or not running or remaining <= 0:
                return CommandList(data=commands)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), min(remaining, state.settings.recheck_s or RECHECK_S))
    finally:
        state.wakeups.unsubscribe(run_id, signal)


@router.post("/{run_id}/commands/{command_id}/ack", response_model=CommandPublic)
def acknowledge_command(
    run_id: RunId, command_id: CommandId, ack: CommandAck, state: State, who: Worker
) -> CommandPublic:
    """The worker applied (or could not apply) a command at `step`; `lr` is the LR now in effect. Repeating
    the same acknowledgement is harmless; a different one is a 409."""
    with transaction(state.sessions, write=True) as session:
        get_run(session, run_id, for_update=True)
        result = public(store.acknowledge(session, run_id, command_id, ack, actor=who.actor))
    return result
