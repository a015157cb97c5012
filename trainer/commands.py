"""Commands from the server to a training job (``decay``, ``set_lr``, ``stop``, ``rollback``), and their
acknowledgements.

The server queues a command for a run (an operator, or an approved AutoDecay decision). The run's background
threads receive it -- in the response to a metrics batch it sends anyway, or by a bounded long-poll of
``GET /api/v1/runs/{id}/commands`` when it has sent nothing for a while -- and keep it in a
:class:`CommandInbox`. The training loop reads ``Run.pending_commands()`` (no I/O) and, at a step boundary,
applies each command once (see :mod:`trainer.torch`), then queues an :class:`Ack` with the step and the LR now
in effect; the sender thread posts it and retries it through outages (the server's ack is idempotent).

This module has no torch and no network code: it is the data the two sides share.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = ["ACTIONS", "Ack", "Command", "CommandInbox"]

logger = logging.getLogger("trainer")

ACTIONS = ("decay", "set_lr", "stop", "rollback")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _checkpoint(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"checkpoint must be an object, got {value!r}")
    return {"id": int(value["id"]), "step": int(value["step"]), "uri": str(value["uri"]), "stage": value.get("stage")}


@dataclasses.dataclass(frozen=True)
class Command:
    """One command as the server sent it (``status`` is the server's at the time it was received)."""

    id: int
    action: str
    factor: float | None = None
    lr: float | None = None
    status: str = "approved"
    reason: str = ""
    created_at: str = ""
    applied_step: int | None = None
    applied_lr: float | None = None
    checkpoint: dict[str, Any] | None = None  # rollback: {"id", "step", "uri", "stage"} of the checkpoint to load

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Command:
        step = body.get("applied_step")
        return cls(
            id=int(body["id"]),
            action=str(body["action"]),
            factor=_opt_float(body.get("factor")),
            lr=_opt_float(body.get("lr")),
            status=str(body.get("status", "approved")),
            reason=str(body.get("reason") or ""),
            created_at=str(body.get("created_at") or ""),
            applied_step=None if step is None else int(step),
            applied_lr=_opt_float(body.get("applied_lr")),
            checkpoint=_checkpoint(body.get("checkpoint")),
        )


@dataclasses.dataclass(frozen=True)
class Ack:
    """What the worker tells the server about one command: applied (or failed) at ``step`` with ``lr``."""

    command_id: int
    status: Literal["applied", "failed"]
    step: int
    lr: float | None
    message: str = ""
    # A checkpoint saved just before it was applied (``POST /runs/{id}/checkpoints`` fields): reported with it.
    checkpoint: Mapping[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "step": self.step, "lr": self.lr, "message": self.message}
        if self.checkpoint is not None:
            body["checkpoint"] = dict(self.checkpoint)
        return body


class CommandInbox:
    """Thread-safe: the background threads add what they receive, the training loop reads it.

    A command stays pending until the loop acknowledges it (:meth:`retire`); from then on the same id is
    ignored when it arrives again (a piggybacked copy sent before the server had the ack, say).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Command] = {}
        self._retired: set[int] = set()
        self.last_id = 0  # the highest id received: the ``after`` of the next poll

    def add(self, commands: Iterable[Command]) -> int:
        """Adds the new ones; returns how many were new."""
        added = 0
        with self._lock:
            for command in commands:
                self.last_id = max(self.last_id, command.id)
                if command.id in self._pending or command.id in self._retired:
                    continue
                if command.status in ("applied", "failed"):  # already acknowledged by someone
                    continue
                self._pending[command.id] = command
                added += 1
        return added

    def add_json(self, items: Iterable[Any], *, run_id: int | None) -> int:
        """Adds commands as the server sent them (a list of JSON objects); malformed ones are logged and skipped."""
        commands: list[Command] = []
        for item in items:
            try:
                commands.append(Command.from_json(item))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.warning("stagewatch: ignoring a malformed command from the server: %.200r", item)
        added = self.add(commands)
        if added:
            logger.info("stagewatch: run %s received command(s): %s", run_id, [c.id for c in commands])
        return added

    def pending(self) -> list[Command]:
        if not self._pending:  # the training loop asks every step; no lock for the usual answer
            return []
        with self._lock:
            return sorted(self._pending.values(), key=lambda c: c.id)

    def retire(self, command_id: int) -> None:
        with self._lock:
            self._pending.pop(command_id, None)
            self._retired.add(command_id)
