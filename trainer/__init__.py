"""Stagewatch's training side: what a training job imports.

It never imports the server: the contract between the two is the HTTP/WebSocket protocol, not shared code.
:func:`start_run` opens a :class:`Run` whose ``log()`` never blocks or raises for network trouble (a
background thread batches, retries, spills to disk and re-sends); :mod:`trainer.errors` lists what can be
raised. Commands from the server (decay, set the LR, stop) are received by the run's background threads
(:mod:`trainer.commands`) and applied at a step boundary by :class:`trainer.torch.CommandApplier`; importing
``trainer`` does not import torch. Adapters for plain PyTorch loops, Lightning and Hugging Face are in
:mod:`trainer.integrations`; reference recipes (model + data) in :mod:`trainer.recipes`, trained by the loop of
:mod:`trainer.loop` behind ``stagewatch train``.
"""

from trainer.client import Client
from trainer.commands import Ack, Command
from trainer.errors import AuthError, RunStateError, ServerError, TrackerError
from trainer.options import RunOptions
from trainer.run import Run, RunState, start_run

__all__ = [
    "Ack",
    "AuthError",
    "Client",
    "Command",
    "Run",
    "RunOptions",
    "RunState",
    "RunStateError",
    "ServerError",
    "TrackerError",
    "start_run",
]
