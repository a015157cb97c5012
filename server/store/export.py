"""Full-resolution export, streamed in chunks so that memory stays flat however long the run is.

Formatting a million rows is the cost that matters here: rows come straight from the driver and each is
formatted by one f-string. ``repr`` gives the shortest text that reads back as the same float.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.models import Series
from server.store.points import PointRow, points_in_range

ExportFormat = Literal["csv", "jsonl"]
CSV_HEADER = "key,step,value,epoch,time\n"
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


def format_rows(fmt: ExportFormat, key: str, rows: Sequence[PointRow]) -> str:
    # One f-string per row, the float reprs inline: the fastest of the forms measured (~1 us per row).
    if fmt == "csv":
        k, special = _csv_key(key), _CSV_VALUE.get
        return "".join(
            [f"{k},{s},{special(r := repr(v), r)},{'' if e is None else repr(e)},{t!r}\n" for s, v, e, t in rows]
        )
    k, special = json.dumps(key), _JSON_VALUE.get
    return "".join(
        [
            f'{{"key":{k},"step":{s},"value":{special(r := repr(v), r)},"epoch":{"null" if e is None else repr(e)},'
            f'"time":{t!r}}}\n'
            for s, v, e, t in rows
        ]
    )


def export_points(
    factory: sessionmaker[Session], run_id: int, keys: Sequence[str] | None, fmt: ExportFormat
) -> Generator[str]:
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
