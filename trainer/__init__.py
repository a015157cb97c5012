"""Stagewatch's training side: what a training job imports.

It never imports the server: the contract between the two is the HTTP/WebSocket protocol, not shared code.
:func:`start_run` opens a :class:`Run` whose ``log()`` never blocks or raises for network trouble (a
background thread batches, retries, spills to disk and re-sends); :mod:`trainer.errors` lists what can be
raised. Reference recipes (model + data + loop) live in :mod:`trainer.recipes`.
"""

from trainer.client import Client
from trainer.errors import AuthError, RunStateError, ServerError, TrackerError
from trainer.run import Run, RunState, start_run

__all__ = ["AuthError", "Client", "Run", "RunState", "RunStateError", "ServerError", "TrackerError", "start_run"]
