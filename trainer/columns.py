"""Points held column-wise: what ``Run.log`` appends to and the sender thread delivers, with no object per point.

Why columns: a training loop logs every step, and whatever a ``log()`` call leaves behind until the sender takes
it (a dict, a tuple) is a container the garbage collector counts. Enough of them start a collection, which in a
PyTorch process walks every tensor, module and function alive: that was half of the measured cost of logging.
Here a call appends to a typed array (``array.array`` keeps raw machine numbers, invisible to the collector).

The arrays are kept per *set of keys* (a :class:`Block`), because a loop logs the same keys call after call:
one row per call -- its step, its epoch, its time and its values side by side -- appended in a single
``array.fromlist`` call. Rows keep the order they were logged in. A missing epoch is stored as NaN (an epoch is
finite by contract, so NaN is free to mean "none"); a step is stored as a double, exact up to ``MAX_STEP``.

:class:`Recorder` is where ``log()`` writes, :class:`Columns` what the sender takes from it and delivers.
"""

from __future__ import annotations

import math
import sys
import threading
from array import array
from typing import Any

import orjson

__all__ = ["LOCKED_WRITES", "MAX_STEP", "Block", "Columns", "Recorder", "encode_points"]

MAX_STEP = 2**53  # the largest step a double holds exactly (and JavaScript, so the dashboard, reads exactly)
HEAD = 3  # step, epoch, time: the numbers before a row's values

# Free-threaded builds (PEP 703) do not make one array operation atomic: there log() takes the recorder's lock too.
LOCKED_WRITES: bool = not getattr(sys, "_is_gil_enabled", lambda: True)()


class Block:
    """The calls that logged exactly ``keys``, one row each in ``rows``: its step, epoch and time, then its values
    in the order of ``keys`` (``HEAD + len(keys)`` numbers a row). ``wake_len`` and ``max_len`` are the lengths
    of ``rows`` at which ``log()`` wakes the sender or hands the rows to the spool (set by :class:`Recorder`)."""

    __slots__ = ("keys", "max_len", "rows", "stride", "wake_len")

    def __init__(self, keys: tuple[str, ...], rows: array[float] | None = None) -> None:
        self.keys = keys
        self.rows: array[float] = array("d") if rows is None else rows
        self.stride = HEAD + len(keys)
        self.wake_len = self.max_len = 0

    def __len__(self) -> int:
        return len(self.rows) // self.stride

    @property
    def steps(self) -> list[int]:
        return list(map(int, self.rows[0 :: self.stride]))

    def append(self, step: int, epoch: float, time: float, values: list[float]) -> None:
        self.rows.fromlist([step, epoch, time, *values])

    def extend(self, other: Block) -> None:
        self.rows.extend(other.rows)

    def cut(self, n: int) -> tuple[Block, Block]:
        """The first ``n`` rows and the rest, as two new blocks."""
        cut = n * self.stride
        return Block(self.keys, self.rows[:cut]), Block(self.keys, self.rows[cut:])


class Recorder:
    """Where ``Run.log`` writes: a :class:`Block` per set of keys that only grows at the end, and from which
    :meth:`take` removes whole rows from the front.

    Writers take no lock. A row is appended by one ``array.fromlist`` call of plain floats and ints, which runs no
    Python code, so under the GIL no other thread sees half a row; :meth:`take` copies and deletes a prefix of
    whole rows, again one C call each. A lock would cost ``log()`` more than everything else it does: between
    torch operations its acquire and release miss the cache, about 1.3 us of a call's 5 (timed piece by piece
    inside the training loop; ``benchmarks/bench_train_overhead.py`` reports the whole call). Takers (the sender
    thread; ``log()`` itself when too much waits) take turns under :attr:`lock`, as writers do on a free-threaded
    build (:data:`LOCKED_WRITES`).

    A set of keys keeps its (emptied) block for the recorder's lifetime: a writer may hold a block it just looked
    up, so a block is never replaced or dropped while the run is open.
    """

    __slots__ = ("_max_rows", "_wake_rows", "blocks", "lock")

    def __init__(self, *, wake_rows: int, max_rows: int) -> None:
        self.blocks: dict[tuple[str, ...], Block] = {}
        self.lock = threading.Lock()
        self._wake_rows = wake_rows
        self._max_rows = max_rows

    def __bool__(self) -> bool:
        return any(block.rows for block in list(self.blocks.values()))

    def block(self, keys: tuple[str, ...]) -> Block:
        """The block of ``keys``, created on first use (by whichever writer comes first)."""
        block = self.blocks.get(keys)
        if block is None:
            fresh = Block(keys)
            fresh.wake_len = self._wake_rows * fresh.stride
            fresh.max_len = self._max_rows * fresh.stride
            block = self.blocks.setdefault(keys, fresh)  # atomic: two writers of new keys get the same block
        return block

    def append(self, keys: tuple[str, ...], row: list[float]) -> Block:
        """Appends ``row`` (step, epoch, time, values) to the block of ``keys``, created if new: ``log()``'s path
        the first time it sees ``keys``, and always on a free-threaded build. Returns the block."""
        block = self.block(keys)
        if LOCKED_WRITES:
            with self.lock:
                block.rows.fromlist(row)
        else:
            block.rows.fromlist(row)
        return block

    def take(self) -> Columns:
        """Everything logged since the last call: each row goes one way, to exactly one taker."""
        taken = Columns()
        with self.lock:
            for keys, block in list(self.blocks.items()):
                rows = block.rows
                n = len(rows)  # whole rows only: each is appended by one call
                if n:
                    taken.blocks[keys] = Block(keys, rows[:n])
                    del rows[:n]  # rows appended since len() stay
        return taken


class Columns:
    """Points of any keys, taken from a :class:`Recorder`: what the sender buffers, sends and spools."""

    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, ...], Block] = {}

    @property
    def points(self) -> int:
        """Counted when asked (by the sender, a few times a batch) rather than by every ``log()`` call."""
        return sum(len(block) * len(block.keys) for block in self.blocks.values())

    def __bool__(self) -> bool:
        return any(block.rows for block in self.blocks.values())

    def block(self, keys: tuple[str, ...]) -> Block:
        block = self.blocks.get(keys)
        if block is None:
            block = self.blocks[keys] = Block(keys)
        return block

    def extend(self, other: Columns) -> None:
        """Appends ``other``'s points after this one's (each block's order of rows is kept)."""
        for keys, block in other.blocks.items():
            self.block(keys).extend(block)

    def cut(self, n: int) -> tuple[Columns, Columns]:
        """About the first ``n`` points and the rest: whole rows, at least one (so that taking makes progress),
        and fewer than one row's keys past ``n``."""
        head, tail = Columns(), Columns()
        taken = 0  # points in head
        full = False  # once a block is not taken whole, the rest is the tail: blocks keep their order
        for keys, block in self.blocks.items():
            width = len(keys)
            size = len(block) * width
            room = n - taken
            rows = 0 if full else room // width if taken else max(1, room // width)
            if rows * width >= size:
                head.blocks[keys] = block
                taken += size
                continue
            full = True
            if rows > 0:
                head.blocks[keys], tail.blocks[keys] = block.cut(rows)
                taken += rows * width
            else:
                tail.blocks[keys] = block
        return head, tail

    def to_points(self) -> list[dict[str, Any]]:
        """The points in the wire form of ``POST /runs/{id}/metrics`` (non-finite values as strings)."""
        points: list[dict[str, Any]] = []
        append = points.append
        for keys, block in self.blocks.items():
            stride = block.stride
            rows = block.rows
            # NaN and infinities travel as strings; a sum over each key's values (in C) tells whether any is there,
            # so that the usual case builds each point with no call per value.
            exact = all(math.isfinite(sum(rows[j::stride])) for j in range(HEAD, stride))
            for at in range(0, len(rows), stride):
                step, epoch, t = int(rows[at]), rows[at + 1], rows[at + 2]
                for j, key in enumerate(keys, at + HEAD):
                    value: float | str = rows[j] if exact else _wire_value(rows[j])
                    if epoch == epoch:
                        append({"key": key, "step": step, "value": value, "time": t, "epoch": epoch})
                    else:
                        append({"key": key, "step": step, "value": value, "time": t})
        return points

    def to_tables(self) -> list[dict[str, Any]]:
        """The points in the column-wise wire form of ``POST /runs/{id}/metrics``: a table per block. A block's
        rows are sliced out of its array in C; only a column holding NaN or an infinity is looked at per value."""
        tables: list[dict[str, Any]] = []
        for keys, block in self.blocks.items():
            stride = block.stride
            rows = block.rows
            table: dict[str, Any] = {"keys": list(keys), "steps": block.steps}
            values = []
            for j in range(HEAD, stride):
                column = rows[j::stride]
                values.append(column.tolist() if math.isfinite(sum(column)) else list(map(_wire_value, column)))
            table["values"] = values
            epochs = rows[1::stride]
            if epochs == epochs:  # no NaN ("no epoch") at all: the usual case, as is
                table["epochs"] = epochs.tolist()
            elif any(e == e for e in epochs):
                table["epochs"] = [e if e == e else None for e in epochs]
            table["times"] = rows[2::stride].tolist()
            tables.append(table)
        return tables

    def encode(self) -> bytes:
        """The request body ``{"tables": [...]}`` of these points: half the bytes of the ``points`` form, and
        cheaper to build here (no object per point) and to check on the server."""
        return orjson.dumps({"tables": self.to_tables()})


def _wire_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def encode_points(points: list[dict[str, Any]]) -> bytes:
    """``{"points": points}`` as compact JSON, by orjson: several times faster than ``json`` on the sender
    thread, whose CPU the training thread waits for (the GIL). Non-finite values must be strings already."""
    return orjson.dumps({"points": points})
