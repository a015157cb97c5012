"""The command poller: one thread that keeps a long-poll ``GET /runs/{id}/commands`` open for a run.

The server answers it the moment a command is queued -- within milliseconds on a LAN -- and at once when the
run has ended, so the thread stops promptly when the run closes. It has its own HTTP connection, so a poll
never delays a metric batch or ``flush``. With ``command_idle_s`` > 0 it only polls after that long without a
metrics response that carried commands (fewer requests, slower delivery). Outages are reported once by the
sender; the poller only backs off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from trainer.backoff import Backoff
from trainer.client import Client, error_detail
from trainer.commands import CommandInbox
from trainer.options import RunOptions

__all__ = ["CommandPoller"]

logger = logging.getLogger("trainer")


class CommandPoller:
    def __init__(
        self,
        client: Client,
        inbox: CommandInbox,
        options: RunOptions,
        *,
        run_id: Callable[[], int | None],
        piggyback_at: Callable[[], float],
    ) -> None:
        self._client = client
        self._inbox = inbox
        self._options = options
        self._run_id = run_id
        self._piggyback_at = piggyback_at  # when a metrics response last carried commands
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagewatch-commands", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Asks the thread to end and waits up to ``timeout``; True when it has ended. A poll in flight ends
        when the server sees the run ended (it answers at once), or at the latest after ``command_wait_s``."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        backoff = Backoff(self._options.retry_max_s)
        idle_s = self._options.command_idle_s
        try:
            while not self._stop.is_set():
                run_id = self._run_id()
                idle_for = time.monotonic() - self._piggyback_at()
                if run_id is None or idle_for < idle_s:
                    self._stop.wait(0.2 if run_id is None else idle_s - idle_for)
                    continue
                try:
                    response = self._client.get_commands(
                        run_id, after=self._inbox.last_id, wait=self._options.command_wait_s
                    )
                    if response.status_code == 200:
                        data = response.json().get("data")
                        self._inbox.add_json(data if isinstance(data, list) else [], run_id=run_id)
                        backoff.succeeded()
                        continue
                    reason = f"HTTP {response.status_code}: {error_detail(response)}"
                except Exception as exc:  # transport trouble, a bad body: never let the thread die
                    reason = f"{type(exc).__name__}: {exc}"
                logger.debug("stagewatch: polling commands of run %s failed (%s)", run_id, reason)
                self._stop.wait(backoff.failed())
        finally:
            self._client.close()
