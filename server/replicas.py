"""Several server processes on one PostgreSQL database: what one commits wakes the waiters of all of them.

Within a process the after-commit hook (:meth:`server.state.AppState.after_commit`) wakes the live-event streams
and the worker long-polls of the runs a transaction changed. Other processes behind the same database learn of it
through PostgreSQL itself, ``LISTEN/NOTIFY``:

* :func:`notify_in_transaction` runs before each commit that changed a run and sends one notification per changed
  run on :data:`CHANNEL`, *inside* the transaction: PostgreSQL delivers it only if the commit succeeds, never
  before the change is visible, and never for a rollback -- the same promise the in-process hook keeps.
* :class:`ChangeListener`, one thread per process on its own autocommit connection, receives them and wakes the
  run's waiters in this process (a notification that this process sent itself is skipped: its hook has already
  woken them).

A notification only wakes; it carries nothing a waiter relies on (waiters read the database). So one lost while
the listener reconnects costs latency, not data: waiters still look at the database every few seconds.

Detection passes are not started by notifications: the process that committed the points runs the pass, and a
PostgreSQL advisory lock (:data:`PASS_LOCK`, see ``server.live.engine``) makes passes of one run take turns
across processes. SQLite is one process's file: nothing here runs on it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from server.store import changes

logger = logging.getLogger("stagewatch.replicas")

CHANNEL = "stagewatch_changes"
# The first key of the advisory lock a detection pass holds on its run: the lock space is shared with anything
# else using advisory locks on the database, so ours is namespaced by this constant (ASCII "SWDP").
PASS_LOCK = 0x53574450
RECONNECT_MAX_S = 5.0

OnChange = Callable[[int, bool], None]  # run id, whether its worker's long-poll has something to fetch


def new_origin() -> str:
    """This process's name in its notifications, so that it can skip its own."""
    return uuid.uuid4().hex[:12]


def payload(origin: str, run_id: int, *, command: bool) -> str:
    return f"{origin}:{run_id}:{'c' if command else 'f'}"


def parse(text_: str) -> tuple[str, int, bool] | None:
    """``(origin, run id, command)``, or None for a payload this version did not send."""
    parts = text_.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in ("c", "f"):
        return None
    return parts[0], int(parts[1]), parts[2] == "c"


def notify_in_transaction(origin: str) -> Callable[[Session], None]:
    """A ``before_commit`` listener for the session factory: one ``pg_notify`` per run the transaction changed."""

    def before_commit(session: Session) -> None:
        changed = changes.peek(session)
        if changed is None:
            return
        payloads = [payload(origin, run_id, command=run_id in changed.commands) for run_id in sorted(changed.all())]
        if payloads:
            session.execute(
                text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
                {"channel": CHANNEL, "payloads": payloads},
            )

    return before_commit


def libpq_url(engine: Engine) -> str:
    """The engine's database as a libpq connection string (SQLAlchemy's ``postgresql+psycopg://`` is not one)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """``LISTEN`` on :data:`CHANNEL` in a thread of its own; ``on_change`` runs in that thread for every change
    committed by another process. Reconnects (with backoff) when the database goes away."""

    def __init__(self, conninfo: str, origin: str, on_change: OnChange) -> None:
        self._conninfo = conninfo
        self._origin = origin
        self._on_change = on_change
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._main, name="stagewatch-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        """Until the first ``LISTEN`` is in place (tests, and the app's start-up); False on timeout."""
        return self._listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _main(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = 0.1
                    while not self._stop.is_set():
                        # A timeout, so that stop() is noticed within a second.
                        for note in conn.notifies(timeout=1.0):
                            self._deliver(note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                logger.warning("listening for other processes' changes failed (%s); again in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _deliver(self, raw: str) -> None:
        parsed = parse(raw)
        if parsed is None:
            logger.warning("ignored a notification this version does not know: %r", raw[:200])
            return
        origin, run_id, command = parsed
        if origin == self._origin:
            return
        try:
            self._on_change(run_id, command)
        except Exception:  # a waiter's problem must not stop the listener for every other run
            logger.exception("waking the waiters of run %s failed", run_id)
