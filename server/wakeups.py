"""Wake requests waiting on a run (long-polls, live-event streams) when something arrives for it."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Wakeups:
    """Per-key asyncio events. Lives on the event loop: ``wake`` must be called there (from threads via
    ``loop.call_soon_threadsafe`` or ``anyio.from_thread.run_sync``). Other server processes are not woken:
    waiters also re-check the database every few seconds so that several processes behind one database
    still work."""

    def __init__(self) -> None:
        self._waiting: defaultdict[int, set[asyncio.Event]] = defaultdict(set)

    def subscribe(self, key: int) -> asyncio.Event:
        """An event set by every ``wake(key)`` until ``unsubscribe``: a wake between two waits is not lost."""
        event = asyncio.Event()
        self._waiting[key].add(event)
        return event

    def unsubscribe(self, key: int, event: asyncio.Event) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiting[key]

    async def wait(self, key: int, timeout: float) -> None:
        event = self.subscribe(key)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.unsubscribe(key, event)

    def waiting(self, key: int) -> bool:
        """Whether anything is subscribed to ``key`` now. Safe from any thread: one read of the map, atomic under
        the GIL (and ``get`` does not add the key to the defaultdict)."""
        return bool(self._waiting.get(key))

    def wake(self, key: int) -> None:
        for event in self._waiting.get(key, ()):
            event.set()
