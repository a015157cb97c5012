"""What the app factory builds once and every request shares: settings, engine, session factory."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.settings import Settings
from server.wakeups import Wakeups


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    schema_revision: str | None
    wakeups: Wakeups = field(default_factory=Wakeups)

    @property
    def grace(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.heartbeat_grace_s)


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.stagewatch
    return state


State = Annotated[AppState, Depends(app_state)]
