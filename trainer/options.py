"""``RunOptions``: how a run's background threads batch, retry, spool and wait. One place for the defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["DEFAULT_SPOOL_ROOT", "RunOptions"]

DEFAULT_SPOOL_ROOT = Path.home() / ".stagewatch" / "spool"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Tuning of one run's client; every field has a default that suits a training loop logging every step.

    - ``timeout``: seconds for one HTTP request (a slow answer is retried; the server's ingest is idempotent).
    - ``batch_points`` / ``batch_interval_s``: a batch is sent when this many points wait, or this often.
    - ``heartbeat_s``: a heartbeat after this long without any request that reached the server.
    - ``max_memory_points``: points kept in memory while the server is unreachable; the rest go to the spool.
    - ``max_queue``: ``log()`` calls waiting for the sender thread before they are handed to the spool writer.
    - ``retry_max_s``: the cap of the exponential backoff between attempts while the server is unreachable.
    - ``close_timeout_s``: how long ``close()`` tries to deliver what is left and the final status.
    - ``command_wait_s`` / ``command_idle_s``: the command long-poll (see :mod:`trainer.poller`).
    - ``spool_root``: where runs without an explicit ``spool_dir`` keep their spool directories.
    """

    timeout: float = 10.0
    batch_points: int = 5000
    batch_interval_s: float = 1.0
    heartbeat_s: float = 30.0
    max_memory_points: int = 200_000
    max_queue: int = 200_000
    retry_max_s: float = 30.0
    close_timeout_s: float = 30.0
    command_wait_s: float = 5.0
    command_idle_s: float = 0.0
    spool_root: Path = DEFAULT_SPOOL_ROOT

    def __post_init__(self) -> None:
        object.__setattr__(self, "spool_root", Path(self.spool_root))  # a str is fine too
        for name in ("timeout", "batch_interval_s", "heartbeat_s", "retry_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("batch_points", "max_memory_points", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.close_timeout_s < 0 or self.command_idle_s < 0:
            raise ValueError("close_timeout_s and command_idle_s must be >= 0")
        if not 0 <= self.command_wait_s <= 30:
            raise ValueError(f"command_wait_s must be within 0..30 (the server's limit), got {self.command_wait_s!r}")
