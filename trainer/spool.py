"""A run's spool: append-only JSON-lines files that hold metric batches the server has not acknowledged.

``pending.jsonl`` holds batches waiting to be (re)sent, one ``{"points": [...]}`` per line, in the wire
format. It is read from a remembered offset and deleted once every line in it has been acknowledged; a
line sent twice (a crash between the send and the offset update) is harmless because the server's ingest
is idempotent. ``rejected.jsonl`` holds batches the server refused for good (409 conflict, 422 invalid, ...),
each with the server's answer, so nothing is silently lost. The sender thread is the only reader; writers
hold the run's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Spool"]

PENDING = "pending.jsonl"
REJECTED = "rejected.jsonl"


def encode_batch(points: list[dict[str, Any]]) -> bytes:
    """A request body; ``allow_nan=False`` because non-finite values travel as strings already."""
    return json.dumps({"points": points}, separators=(",", ":"), allow_nan=False).encode()


class Spool:
    """The spool directory of one run (created on first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending_path = directory / PENDING
        self.rejected_path = directory / REJECTED
        self._offset = 0  # bytes of pending.jsonl already acknowledged
        self.points_written = 0

    def append(self, points: list[dict[str, Any]]) -> None:
        """Appends one batch to the pending file, flushed to the OS before returning."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.pending_path.open("ab") as f:
            f.write(encode_batch(points) + b"\n")
        self.points_written += len(points)

    def reject(self, body: bytes, status_code: int, detail: str) -> None:
        """Keeps a batch the server refused for good, with its answer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"status_code": status_code, "detail": detail, "batch": json.loads(body)}
        with self.rejected_path.open("ab") as f:
            f.write(json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n")

    def has_pending(self) -> bool:
        try:
            return self.pending_path.stat().st_size > self._offset
        except FileNotFoundError:
            return False

    def pending_batches(self) -> Iterator[tuple[bytes, int]]:
        """Yields ``(body, end_offset)`` for each unacknowledged line; call ``ack(end_offset)`` after each."""
        try:
            f = self.pending_path.open("rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(self._offset)
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):  # EOF, or a line still being written
                    return
                yield line.rstrip(b"\n"), f.tell()

    def ack(self, end_offset: int) -> None:
        self._offset = end_offset

    def truncate_if_done(self) -> bool:
        """Deletes the pending file once all of it is acknowledged; True if nothing is pending any more."""
        if self.has_pending():
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pending_path)
        self._offset = 0
        return True
