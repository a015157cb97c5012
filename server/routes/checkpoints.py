"""Stage checkpoints: the worker reports where it saved one; anyone may list them; an operator rolls back to one."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from server.auth import Operator, Viewer, Worker
from server.db import transaction
from server.errors import ERROR_RESPONSES
from server.routes.commands import public as command_public
from server.schemas import CheckpointCreate, CheckpointList, CheckpointPublic, CommandPublic, RollbackRequest, RunId
from server.state import State
from server.store import checkpoints as store
from server.store.runs import get_run

router = APIRouter(prefix="/api/v1/runs", tags=["checkpoints"], responses=ERROR_RESPONSES)


@router.post(
    "/{run_id}/checkpoints",
    response_model=CheckpointPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: {"description": "The checkpoint was recorded."},
        200: {"model": CheckpointPublic, "description": "This `step` and `uri` were reported before: that report."},
    },
)
def report_checkpoint(
    run_id: RunId, data: CheckpointCreate, state: State, who: Worker, response: Response
) -> CheckpointPublic:
    """The worker saved a checkpoint: where (`uri`, in the user's storage), at which `step`, the `stage` it ends,
    the `decision` it was saved before, the `lr` and `metrics` then. Reporting the same (`step`, `uri`) again
    answers 200 with the first report, unchanged."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        checkpoint, created = store.add_checkpoint(session, run, data, actor=who.actor)
        result = store.public(checkpoint)
    if not created:
        response.status_code = status.HTTP_200_OK
    return result


@router.get("/{run_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(run_id: RunId, state: State, _: Viewer) -> CheckpointList:
    """The run's checkpoints in step order (the stage each one ends is in `stage`)."""
    with transaction(state.sessions) as session:
        get_run(session, run_id)
        return CheckpointList(data=store.with_stages(session, run_id, store.list_checkpoints(session, run_id)))


@router.post("/{run_id}/rollback", response_model=CommandPublic, status_code=status.HTTP_201_CREATED)
def rollback(run_id: RunId, data: RollbackRequest, state: State, who: Operator) -> CommandPublic:
    """Roll the run back to one of its checkpoints (`checkpoint_id`): a `rollback` command for the worker. When the
    worker acknowledges it (it loaded the checkpoint), the run is rewound to the checkpoint's step (later points go
    to the audit log), the decisions applied since are marked `rolled_back`, and the detector is held for `backoff`
    (default: the run's `reject_backoff`)."""
    with transaction(state.sessions, write=True) as session:
        run = get_run(session, run_id, for_update=True)
        result = command_public(store.queue_rollback(session, run, data, actor=who.actor))
    return result
