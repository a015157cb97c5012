"""A request's points, column-wise per key: what the ingest stores, from either wire form of a batch.

``POST /runs/{id}/metrics`` takes ``{"points": [...]}`` (an object per point) or ``{"tables": [...]}``
(column-wise: keys, steps, and a list of values per key). Both become the same :class:`Column` lists here, so
the ingest (``server.store.metrics``) has one path. Every point keeps its position in the request (``index``,
counting the tables' points table by table, key by key, step by step) and :meth:`Batch.where` names it the way
the request wrote it (``points[3]``, ``tables[0].values[1][5]``) in error messages.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from server.errors import Invalid
from server.schemas import NON_FINITE, MetricBatch, MetricValue, PointIn, TableIn, decode_value, encode_stored_value

__all__ = ["Batch", "Column", "from_points", "from_request"]


@dataclass
class Column:
    """The points of one key within a batch, deduplicated; ``index`` is each point's position in the request.
    Column lists, built with C-level map/zip, keep a 10,000-point batch to a few milliseconds of Python."""

    key: str
    index: list[int]
    steps: list[int]
    values: list[float | None]  # None is NaN, as stored
    epochs: list[float | None]
    times: list[float]

    def take(self, keep: Sequence[int]) -> Column:
        return Column(
            self.key,
            [self.index[j] for j in keep],
            [self.steps[j] for j in keep],
            [self.values[j] for j in keep],
            [self.epochs[j] for j in keep],
            [self.times[j] for j in keep],
        )

    def extend(self, other: Column) -> None:
        self.index += other.index
        self.steps += other.steps
        self.values += other.values
        self.epochs += other.epochs
        self.times += other.times


@dataclass
class Batch:
    """The columns of one request and the number of points it held (``accepted``)."""

    columns: list[Column]
    count: int
    # tables form: where each table's points start in ``index`` order, its number of steps and its keys
    _starts: list[int] = field(default_factory=list)
    _shapes: list[tuple[int, int]] = field(default_factory=list)

    def where(self, index: int) -> str:
        """The point at ``index`` as the request wrote it."""
        if not self._starts:
            return f"points[{index}]"
        t = bisect_right(self._starts, index) - 1
        rows, _ = self._shapes[t]
        k, r = divmod(index - self._starts[t], rows)
        return f"tables[{t}].values[{k}][{r}]"


def same(a: float | None, b: float | None) -> bool:
    """Stored values are equal (None, NaN, equals itself)."""
    return a == b or (a is None and b is None)


def from_request(batch: MetricBatch, now: float) -> Batch:
    """The validated body of ``POST /runs/{id}/metrics`` as columns; ``now`` stands in for missing times."""
    points, tables = batch.get("points"), batch.get("tables")
    if points is None and tables is None:
        raise Invalid('body: expected {"points": [...]} or {"tables": [...]}')
    if points is not None and tables is not None:
        raise Invalid('body: send either "points" or "tables", not both')
    if points is not None:
        return from_points(points, now)
    assert tables is not None
    return _from_tables(tables, now)


def from_points(points: Sequence[PointIn], now: float) -> Batch:
    """The ``points`` form as columns."""
    keys = list(map(itemgetter("key"), points))
    steps = list(map(itemgetter("step"), points))
    # NaN is stored as None: a float NaN (from Python callers; JSON sends "NaN") must compare equal to it on resend.
    values = [None if v != v else v for v in map(decode_value, map(itemgetter("value"), points))]
    epochs = [p.get("epoch") for p in points]
    times = [now if t is None else t for t in (p.get("time") for p in points)]
    positions: dict[str, list[int]] = {}
    if len(set(keys)) == 1:
        positions[keys[0]] = list(range(len(keys)))
    else:
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
    batch = Batch([], len(points))
    for key, idx in positions.items():
        column = Column(
            key,
            idx,
            [steps[i] for i in idx],
            [values[i] for i in idx],
            [epochs[i] for i in idx],
            [times[i] for i in idx],
        )
        batch.columns.append(_deduped(column, batch) if len(set(column.steps)) != len(column.steps) else column)
    return batch


def _from_tables(tables: Sequence[TableIn], now: float) -> Batch:
    batch = Batch([], 0)
    by_key: dict[str, Column] = {}
    for t, table in enumerate(tables):
        keys, steps, values = table["keys"], table["steps"], table["values"]
        rows = len(steps)
        _check_shape(t, table)
        epochs = table.get("epochs") or [None] * rows
        times = table.get("times")
        times_now: list[float] = [now] * rows if times is None else [now if x is None else x for x in times]
        batch._starts.append(batch.count)
        batch._shapes.append((rows, len(keys)))
        for k, key in enumerate(keys):
            start = batch.count + k * rows
            column = Column(key, list(range(start, start + rows)), steps, _stored(values[k]), epochs, times_now)
            if key in by_key:
                by_key[key].extend(column)
            else:  # its own lists: a later table of the same key extends them
                by_key[key] = Column(key, column.index, list(steps), column.values, list(epochs), list(times_now))
        batch.count += rows * len(keys)
    for column in by_key.values():
        batch.columns.append(_deduped(column, batch) if len(set(column.steps)) != len(column.steps) else column)
    return batch


def _check_shape(t: int, table: TableIn) -> None:
    keys, rows = table["keys"], len(table["steps"])
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise Invalid(f"tables[{t}].keys: {repeated!r} appears twice; each key once per table")
    if len(table["values"]) != len(keys):
        raise Invalid(f"tables[{t}].values: {len(table['values'])} lists for {len(keys)} keys; one list per key")
    for k, column in enumerate(table["values"]):
        if len(column) != rows:
            raise Invalid(f"tables[{t}].values[{k}]: {len(column)} values for {rows} steps; one value per step")
    for name, given in (("epochs", table.get("epochs")), ("times", table.get("times"))):
        if given is not None and len(given) != rows:
            raise Invalid(f"tables[{t}].{name}: {len(given)} entries for {rows} steps; one per step")


def _stored(values: list[MetricValue]) -> list[float | None]:
    """Values as stored (NaN as None, the non-finite names as floats); a plain list of numbers is the usual case."""
    if str not in set(map(type, values)):  # in C: no Python call per value
        return values  # type: ignore[return-value]  # all numbers: finite by validation
    return [NON_FINITE[v] if isinstance(v, str) else v for v in values]


def _deduped(column: Column, batch: Batch) -> Column:
    """Drop repeats of a (key, step) within one batch; a repeat with another value is an error."""
    first: dict[int, int] = {}
    keep = []
    for j, step in enumerate(column.steps):
        seen = first.get(step)
        if seen is None:
            first[step] = j
            keep.append(j)
        elif not same(column.values[seen], column.values[j]):
            raise Invalid(
                f"{batch.where(column.index[j])}: key {column.key!r} step {step} appears twice in the batch with "
                f"different values ({batch.where(column.index[seen])} has {encode_stored_value(column.values[seen])},"
                f" this one {encode_stored_value(column.values[j])})"
            )
    return column.take(keep)
