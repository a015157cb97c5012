"""Capped exponential backoff with jitter, for every retry loop of the client (sender, poller, close)."""

from __future__ import annotations

import random
import time

__all__ = ["Backoff"]


class Backoff:
    """``failed()`` schedules the next attempt 0.25 s, 0.5 s, 1 s, ... later, capped at ``cap_s`` and jittered
    down by up to 20 % so that many workers do not retry in lockstep after a server restart."""

    def __init__(self, cap_s: float, *, base_s: float = 0.25) -> None:
        self.cap_s = cap_s
        self.base_s = base_s
        self.failures = 0
        self._next_at = 0.0

    def failed(self) -> float:
        """Records a failure; returns the delay until the next attempt."""
        self.failures += 1
        delay: float = min(self.cap_s, self.base_s * 2 ** min(self.failures, 16)) * random.uniform(0.8, 1.0)
        self._next_at = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._next_at = 0.0

    def retry_now(self) -> None:
        """The next attempt may start at once (someone is waiting on it), without forgetting the failures."""
        self._next_at = 0.0

    def remaining(self) -> float:
        """Seconds until the next attempt is due (0 when it is)."""
        return max(0.0, self._next_at - time.monotonic())
