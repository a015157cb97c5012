"""What the app factory builds once and every request shares: settings, engine, session factory, wakeups."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.live.engine import LiveDetection
from server.replicas import new_origin
from server.settings import Settings
from server.store import changes
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
    origin: str = field(default_factory=new_origin)  # this process, in its notifications (server.replicas)
    loop: asyncio.AbstractEventLoop | None = None  # the app's event loop, where waiters wait (lifespan)

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

    def after_commit(self, session: Session) -> None:
        """The one place that acts on a commit (a listener on the session factory; see ``server.store.changes``):
        wakes the changed runs' streams and long-polls on the event loop, and queues a detection pass."""
        changed = changes.take(session)
        if changed is None:
            return
        live = self.live
        if live is not None and not session.info.get(changes.DETECTING):
            for run_id in changed.runs:
                live.notify(run_id)
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        # Only where a request waits: each call wakes the event loop (a write to its pipe, a thread switch), which
        # a one-point ingest paid on every commit. No wake-up is lost: waiters subscribe before they read the
        # database, so one that subscribes after this check reads what this commit wrote.
        feed, wakeups = self.feed, self.wakeups
        anyone = feed.waiting(ALL_RUNS)
        for run_id in changed.all():
            command = run_id in changed.commands
            if anyone or feed.waiting(run_id) or (command and wakeups.waiting(run_id)):
                loop.call_soon_threadsafe(functools.partial(self.announce, run_id, command=command))

    def remote_change(self, run_id: int, command: bool) -> None:
        """Another server process committed a change of ``run_id`` (``server.replicas``; any thread): wakes its
        waiters here. No detection pass: the process that committed it runs that."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(functools.partial(self.announce, run_id, command=command))


async def app_state(request: Request) -> AppState:
    # A coroutine, though it does no I/O: FastAPI runs a plain-function dependency in its thread pool, a hop
    # that cost every request ~0.1-0.5 ms of thread switching (more under load).
    state: AppState = request.app.state.stagewatch
    return state


State = Annotated[AppState, Depends(app_state)]
