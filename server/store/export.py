"""Full-resolution export, streamed in chunks so that memory stays flat however long the run is."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.models import MetricPoint, Series
from server.schemas import encode_stored_value, encode_value

ExportFormat = Literal["csv", "jsonl"]
CHUNK_ROWS = 20_000
CSV_HEADER = "key,step,value,epoch,time\n"


def _csv_field(value: float | str | None) -> str:
    return "" if value is None else str(value) if isinstance(value, str) else repr(value)


def _csv_key(key: str) -> str:
    if any(c in key for c in ',"\n\r'):
        return '"' + key.replace('"', '""') + '"'
    return key


def _format(fmt: ExportFormat, key: str, rows: Sequence[tuple[int, float | None, float | None, float]]) -> str:
    if fmt == "csv":
        k = _csv_key(key)
        return "".join(
            f"{k},{step},{_csv_field(encode_stored_value(v))},{_csv_field(encode_value(e))},{t!r}\n"
            for step, v, e, t in rows
        )
    k = json.dumps(key)
    return "".join(
        f'{{"key":{k},"step":{step},"value":{json.dumps(encode_stored_value(v))},'
        f'"epoch":{json.dumps(encode_value(e))},"time":{t!r}}}\n'
        for step, v, e, t in rows
    )


def export_points(
    factory: sessionmaker[Session], run_id: int, keys: Sequence[str] | None, fmt: ExportFormat
) -> Iterator[str]:
    """Yields the run's points, key by key in step order, in one read transaction (a consistent snapshot)."""
    with transaction(factory, snapshot=True) as session:
        if fmt == "csv":
            yield CSV_HEADER
        query = select(Series.id, Series.key).where(Series.run_id == run_id)
        if keys:
            query = query.where(Series.key.in_(keys))
        for series_id, key in session.execute(query.order_by(Series.key)).all():
            after = -1
            while True:
                rows = session.execute(
                    select(MetricPoint.step, MetricPoint.value, MetricPoint.epoch, MetricPoint.time)
                    .where(MetricPoint.series_id == series_id, MetricPoint.step > after)
                    .order_by(MetricPoint.step)
                    .limit(CHUNK_ROWS)
                ).all()
                if not rows:
                    break
                yield _format(fmt, key, rows)
                after = rows[-1][0]
