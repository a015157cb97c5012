"""What a transaction changed that someone waits on, collected as it happens and acted on once it commits.

Store code marks a run when it records a change (:func:`server.store.feed.add_feed_event` marks every run it
writes an event for; an approved command or a run that ends also wakes the worker's long-poll). One
``after_commit`` hook (:meth:`server.state.AppState.after_commit`) then wakes the live-event streams, the
worker's long-poll and live detection -- never before the commit (a waiter would find nothing new), never after
a rollback, and no route has to remember to do it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

__all__ = ["Changes", "mark", "peek", "take"]

_KEY = "stagewatch_changes"
DETECTING = "stagewatch_detecting"  # set on a detection pass's session: its own changes need no further pass


@dataclass
class Changes:
    runs: set[int] = field(default_factory=set)  # new feed events: wake live-event streams and detection
    commands: set[int] = field(default_factory=set)  # a command to fetch, or the run ended: wake its long-poll

    def all(self) -> set[int]:
        return self.runs | self.commands


def mark(session: Session, run_id: int, *, command: bool = False) -> None:
    changes: Changes = session.info.setdefault(_KEY, Changes())
    changes.runs.add(run_id)
    if command:
        changes.commands.add(run_id)


def peek(session: Session) -> Changes | None:
    """What the transaction changed so far, left in place (``before_commit``: the commit may still fail)."""
    changes: Changes | None = session.info.get(_KEY)
    return changes


def take(session: Session) -> Changes | None:
    """What the transaction that just ended changed (and forgets it)."""
    changes: Changes | None = session.info.pop(_KEY, None)
    return changes
