"""Streaming a blocking generator without serialising its work with the network."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator
from contextlib import closing

_DONE = object()


async def prefetched(chunks: Generator[bytes], *, depth: int = 2) -> AsyncIterator[bytes]:
    """Yield ``chunks``, produced in a worker thread up to ``depth`` ahead of the consumer.

    Starlette iterates a sync generator one step at a time in the thread pool, so the database read and
    formatting of chunk N+1 waits until chunk N has been written to the socket. Here they overlap. When the
    consumer stops early (the client went away) the producer is told to stop and the generator is closed in
    its own thread, which ends its database transaction.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def produce() -> None:
        outcome: object = _DONE
        try:
            with closing(chunks):
                for chunk in chunks:
                    if stop.is_set():
                        break
                    put(chunk)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            outcome = exc
        put(outcome)

    producer = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
    finally:
        stop.set()
        # Drain so that a producer blocked on a full queue can finish, then wait for it.
        while not producer.done():
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.01)
        await producer
