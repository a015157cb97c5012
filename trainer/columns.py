"""Points held column-wise: what ``Run.log`` appends to and the sender thread delivers, with no object per point.

Why columns: a training loop logs every step, and whatever a ``log()`` call leaves behind until the sender takes
it (a dict, a tuple) is a container the garbage collector counts. Enough of them start a collection, which in a
PyTorch process walks every tensor, module and function alive: that was half of the measured cost of logging.
Here a call appends to typed arrays (``array.array`` keeps raw machine numbers, invisible to the collector),
and the sender swaps the whole :class:`Columns` out at once.

The arrays are kept per *set of keys* (a :class:`Block`), because a loop logs the same keys call after call:
one row per call -- its epoch, time and values side by side -- and its step. A call is then two appends,
whatever the number of keys. Rows keep the order they were logged in. A missing epoch is stored as
NaN (an epoch is finite by contract, so NaN is free to mean "none").
"""

from __future__ import annotations

import math
from array import array
from typing import Any

import orjson

__all__ = ["Block", "Columns", "encode_points"]


class Block:
    """The calls that logged exactly ``keys``, one row each: its step in ``steps``; its epoch, its time and its
    values (in the order of ``keys``) side by side in ``rows``, ``2 + len(keys)`` numbers a row."""

    __slots__ = ("keys", "rows", "steps")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.steps = array("q")
        self.rows = array("d")

    def __len__(self) -> int:
        return len(self.steps)

    def extend(self, other: Block) -> None:
        self.steps.extend(other.steps)
        self.rows.extend(other.rows)

    def cut(self, n: int) -> tuple[Block, Block]:
        """The first ``n`` rows and the rest, as two new blocks."""
        head, tail = Block(self.keys), Block(self.keys)
        cut = n * (2 + len(self.keys))
        head.steps, tail.steps = self.steps[:n], self.steps[n:]
        head.rows, tail.rows = self.rows[:cut], self.rows[cut:]
        return head, tail


class Columns:
    """Points of any keys; ``calls`` counts the ``log()`` calls that added them (the sender's wake-up)."""

    __slots__ = ("blocks", "calls")

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, ...], Block] = {}
        self.calls = 0

    @property
    def points(self) -> int:
        """Counted when asked (by the sender, a few times a batch) rather than by every ``log()`` call."""
        return sum(len(block.steps) * len(block.keys) for block in self.blocks.values())

    def __bool__(self) -> bool:
        return any(block.steps for block in self.blocks.values())

    def block(self, keys: tuple[str, ...]) -> Block:
        block = self.blocks.get(keys)
        if block is None:
            block = self.blocks[keys] = Block(keys)
        return block

    def extend(self, other: Columns) -> None:
        """Appends ``other``'s points after this one's (each block's order of rows is kept)."""
        for keys, block in other.blocks.items():
            self.block(keys).extend(block)
        self.calls += other.calls

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
            stride = 2 + len(keys)
            rows = block.rows
            # NaN and infinities travel as strings; a sum over each key's values (in C) tells whether any is there,
            # so that the usual case builds each point with no call per value.
            exact = all(math.isfinite(sum(rows[j::stride])) for j in range(2, stride))
            for i, step in enumerate(block.steps):
                at = i * stride
                epoch, t = rows[at], rows[at + 1]
                for j, key in enumerate(keys, at + 2):
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
            stride = 2 + len(keys)
            rows = block.rows
            table: dict[str, Any] = {"keys": list(keys), "steps": block.steps.tolist()}
            values = []
            for j in range(2, stride):
                column = rows[j::stride]
                values.append(column.tolist() if math.isfinite(sum(column)) else list(map(_wire_value, column)))
            table["values"] = values
            epochs = rows[0::stride]
            if epochs == epochs:  # no NaN ("no epoch") at all: the usual case, as is
                table["epochs"] = epochs.tolist()
            elif any(e == e for e in epochs):
                table["epochs"] = [e if e == e else None for e in epochs]
            table["times"] = rows[1::stride].tolist()
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
