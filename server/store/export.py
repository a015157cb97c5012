"""Full-resolution export, streamed in chunks so that memory stays flat however long the run is.

Formatting a million rows is the cost that matters here. Each chunk is turned into columns and every column
is formatted at once by orjson (shortest round-trip text for floats, like ``repr``), then the columns are
zipped into lines at C speed: about 3x faster than formatting row by row in Python. Chunks holding a
non-finite value (rare) take the row-by-row path, which spells them "NaN", "Infinity" and "-Infinity".
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterable, Sequence
from itertools import repeat
from typing import Literal

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.models import Series
from server.store.points import PointRow, points_in_range

ExportFormat = Literal["csv", "jsonl"]
CSV_HEADER = b"key,step,value,epoch,time\n"
FIRST_CHUNK_ROWS = 2_000  # a quick first byte
CHUNK_ROWS = 50_000
LAST_STEP = 2**62

# repr() of a stored value -> its text. NULL (None) is NaN in the store.
_CSV_VALUE = {"None": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_VALUE = {"None": '"NaN"', "inf": '"Infinity"', "-inf": '"-Infinity"'}


def _csv_key(key: str) -> str:
    if any(c in key for c in ',"\n\r'):
        return '"' + key.replace('"', '""') + '"'
    return key


def _column(values: Sequence[object]) -> list[bytes]:
    return orjson.dumps(values)[1:-1].split(b",")


def _all_finite(values: Sequence[float | None]) -> bool:
    return None not in values and math.inf not in values and -math.inf not in values


def format_rows(fmt: ExportFormat, key: str, rows: Sequence[PointRow]) -> bytes:
    steps, values, epochs, times = zip(*rows, strict=True)
    if not _all_finite(values):
        return _format_rows_slowly(fmt, key, rows)
    epoch_text: Iterable[bytes]
    if epochs.count(None) == len(epochs):
        epoch_text = repeat(b"" if fmt == "csv" else b"null")
    elif fmt == "csv":
        epoch_text = [b"" if e == b"null" else e for e in _column(epochs)]
    else:
        epoch_text = _column(epochs)
    columns = zip(_column(steps), _column(values), epoch_text, _column(times), strict=False)
    if fmt == "csv":
        return b"".join(map((_csv_key(key).encode() + b",%b,%b,%b,%b\n").__mod__, columns))
    line = b'{"key":' + json.dumps(key).encode() + b',"step":%b,"value":%b,"epoch":%b,"time":%b}\n'
    return b"".join(map(line.__mod__, columns))


def _format_rows_slowly(fmt: ExportFormat, key: str, rows: Sequence[PointRow]) -> bytes:
    if fmt == "csv":
        k, special = _csv_key(key), _CSV_VALUE.get
        text = "".join(
            [f"{k},{s},{special(r := repr(v), r)},{'' if e is None else repr(e)},{t!r}\n" for s, v, e, t in rows]
        )
    else:
        k, special = json.dumps(key), _JSON_VALUE.get
        text = "".join(
            [
                f'{{"key":{k},"step":{s},"value":{special(r := repr(v), r)},'
                f'"epoch":{"null" if e is None else repr(e)},"time":{t!r}}}\n'
                for s, v, e, t in rows
            ]
        )
    return text.encode()


def export_points(
    factory: sessionmaker[Session], run_id: int, keys: Sequence[str] | None, fmt: ExportFormat
) -> Generator[bytes]:
    """Yields the run's points, key by key in step order, in one read transaction (a consistent snapshot)."""
    with transaction(factory, snapshot=True) as session:
        if fmt == "csv":
            yield CSV_HEADER
        query = select(Series.id, Series.key).where(Series.run_id == run_id)
        if keys:
            query = query.where(Series.key.in_(keys))
        chunk = FIRST_CHUNK_ROWS
        for series_id, key in session.execute(query.order_by(Series.key)).all():
            after = -1
            while rows := points_in_range(session, series_id, after + 1, LAST_STEP, limit=chunk):
                yield format_rows(fmt, key, rows)
                after = rows[-1][0]
                chunk = CHUNK_ROWS
