"""Wake long-polling requests of a run when something arrives for it (in this process)."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Wakeups:
    """Per-run events for long-polls. Lives on the event loop: ``wake`` must be called there (sync handlers
    use ``anyio.from_thread.run_sync``). Other server processes are not woken: pollers also re-check the
    database every ``recheck_s`` so that several workers behind one database still work."""

    def __init__(self) -> None:
        self._waiting: defaultdict[int, set[asyncio.Event]] = defaultdict(set)

    async def wait(self, run_id: int, timeout: float) -> None:
        event = asyncio.Event()
        self._waiting[run_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiting.get(run_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[run_id]

    def wake(self, run_id: int) -> None:
        for event in self._waiting.get(run_id, ()):
            event.set()
