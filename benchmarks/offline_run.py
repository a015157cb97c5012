"""A run for :func:`trainer.loop.fit` that goes nowhere: no server, no points kept, no commands.

``record_curves`` trains through it (it records what it needs through ``fit``'s hooks), and
``bench_train_overhead`` uses it as the no-logging baseline that a real :class:`trainer.run.Run` is compared
with, so both go through the loop ``stagewatch train`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping

from trainer.commands import Command

__all__ = ["OfflineRun"]


class OfflineRun:
    """A :class:`trainer.loop.FitRun` whose ``log`` discards the points and which never receives a command."""

    id: int | None = None
    should_stop = False

    def log(self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False) -> None:
        pass

    def sync_detection(self, timeout: float = 30.0) -> bool:
        return True  # no detection to wait for

    def pending_commands(self) -> list[Command]:
        return []

    def ack_command(self, command_id: int, *, status: str, step: int, lr: float | None, message: str = "") -> None:
        raise AssertionError(f"command {command_id} acknowledged, but an offline run receives none")
