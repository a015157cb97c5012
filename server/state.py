"""What the app factory builds once and every request shares: settings, engine, session factory, wakeups."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Annotated

import anyio.from_thread
from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.live.engine import LiveDetection
from server.settings import Settings
from server.wakeups import Wakeups

ALL_RUNS = 0  # the live-feed wakeup key of "any run" (run ids start at 1)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    schema_revision: str | None
    wakeups: Wakeups = field(default_factory=Wakeups)  # a run's worker long-polling for commands
    feed: Wakeups = field(default_factory=Wakeups)  # live-event streams, per run and ALL_RUNS
    live: LiveDetection | None = None  # started with the app (lifespan)

    @property
    def grace(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.heartbeat_grace_s)

    def announce(self, run_id: int, *, command: bool = False) -> None:
        """Something of ``run_id`` was committed: wake its live-event streams (and its worker's long-poll
        when a command is waiting). Call on the event loop."""
        if command:
            self.wakeups.wake(run_id)
        self.feed.wake(run_id)
        self.feed.wake(ALL_RUNS)

    def announce_from_thread(self, run_id: int, *, command: bool = False) -> None:
        """``announce`` from a sync route handler (a worker thread of the event loop)."""
        anyio.from_thread.run_sync(lambda: self.announce(run_id, command=command))


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.stagewatch
    return state


State = Annotated[AppState, Depends(app_state)]
