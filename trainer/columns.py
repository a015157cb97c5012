"""Points held column-wise: what ``Run.log`` appends to and the sender thread delivers, with no object per point.

Why columns: a training loop logs every step, and whatever a ``log()`` call leaves behind until the sender takes
it (a dict, a tuple) is a container the garbage collector counts. Enough of them start a collection, which in a
PyTorch process walks every tensor, module and function alive: that was half of the measured cost of logging.
Here a call appends to typed arrays (``array.array`` keeps raw machine numbers, invisible to the collector),
per key, and the sender swaps the whole :class:`Columns` out at once.

A column keeps each key's points in the order they were logged. A missing epoch is stored as NaN (an epoch is
finite by contract, so NaN is free to mean "none").
"""

from __future__ import annotations

import math
from array import array
from typing import Any

import orjson

__all__ = ["Column", "Columns", "encode_points"]


class Column:
    """One key's points: four arrays of the same length."""

    __slots__ = ("epochs", "steps", "times", "values")

    def __init__(self) -> None:
        self.steps = array("q")
        self.values = array("d")
        self.epochs = array("d")  # NaN: no epoch
        self.times = array("d")

    def __len__(self) -> int:
        return len(self.steps)

    def extend(self, other: Column) -> None:
        self.steps.extend(other.steps)
        self.values.extend(other.values)
        self.epochs.extend(other.epochs)
        self.times.extend(other.times)

    def cut(self, n: int) -> tuple[Column, Column]:
        """The first ``n`` points and the rest, as two new columns."""
        head, tail = Column(), Column()
        head.steps, tail.steps = self.steps[:n], self.steps[n:]
        head.values, tail.values = self.values[:n], self.values[n:]
        head.epochs, tail.epochs = self.epochs[:n], self.epochs[n:]
        head.times, tail.times = self.times[:n], self.times[n:]
        return head, tail


class Columns:
    """Points of several keys; ``calls`` counts the ``log()`` calls that added them (the sender's wake-up)."""

    __slots__ = ("calls", "keys", "points")

    def __init__(self) -> None:
        self.keys: dict[str, Column] = {}
        self.points = 0
        self.calls = 0

    def __bool__(self) -> bool:
        return self.points > 0

    def column(self, key: str) -> Column:
        column = self.keys.get(key)
        if column is None:
            column = self.keys[key] = Column()
        return column

    def extend(self, other: Columns) -> None:
        """Appends ``other``'s points after this one's (each key's order is kept)."""
        for key, column in other.keys.items():
            self.column(key).extend(column)
        self.points += other.points
        self.calls += other.calls

    def cut(self, n: int) -> tuple[Columns, Columns]:
        """About the first ``n`` points (whole keys first, the last one split) and the rest."""
        head, tail = Columns(), Columns()
        for key, column in self.keys.items():
            room = n - head.points
            if room >= len(column):
                head.keys[key] = column
                head.points += len(column)
            elif room > 0:
                head.keys[key], tail.keys[key] = column.cut(room)
                head.points += room
                tail.points += len(column) - room
            else:
                tail.keys[key] = column
                tail.points += len(column)
        return head, tail

    def to_points(self) -> list[dict[str, Any]]:
        """The points in the wire form of ``POST /runs/{id}/metrics`` (non-finite values as strings)."""
        points: list[dict[str, Any]] = []
        append = points.append
        for key, c in self.keys.items():
            for step, value, epoch, t in zip(c.steps, c.values, c.epochs, c.times, strict=True):
                point: dict[str, Any] = {"key": key, "step": step, "value": _wire_value(value), "time": t}
                if epoch == epoch:
                    point["epoch"] = epoch
                append(point)
        return points

    def encode(self) -> bytes:
        """The request body ``{"points": [...]}`` of these points."""
        return encode_points(self.to_points())


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
