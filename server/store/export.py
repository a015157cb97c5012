"""Full-resolution export: CSV, JSON lines or Parquet, streamed in chunks so that memory stays flat however long
the run is, from one consistent snapshot of the run.

Formatting millions of floats is the cost that matters, and Python objects per row are what makes it slow, so no
row becomes a Python object on the fast paths:

- PostgreSQL formats CSV and JSON lines itself, 50,000 points to a statement, each chunk one text value
  (``string_agg``; floats as ``float8`` text, the shortest form that reads back exactly).
- SQLite's points are read in chunks, turned into Arrow columns and formatted by Arrow's compute kernels
  (shortest round-trip text too), with no Python object per formatted value.
- Parquet is written by pyarrow from Arrow columns on both engines.

Floats are written in their shortest round-trip form, which may differ in spelling between the engines (``1`` or
``1.0``, ``1e-07`` or ``1e-7``) but always reads back as the same float. A stored NULL value is NaN (see
``server.models``): "NaN" in CSV and JSON lines (and "Infinity", "-Infinity"), a NaN in Parquet.
"""

from __future__ import annotations

import io
import json
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db import transaction
from server.models import Series
from server.store.points import points_in_range

ExportFormat = Literal["csv", "jsonl", "parquet"]
MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
CSV_HEADER = b"key,step,value,epoch,time\n"
CHUNK_ROWS = 100_000
LAST_STEP = 2**62

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),  # NaN is a NaN, not a null
        pa.field("epoch", pa.float64()),
        pa.field("time", pa.float64(), nullable=False),
    ]
)


def export_points(
    factory: sessionmaker[Session], run_id: int, keys: Sequence[str] | None, fmt: ExportFormat
) -> Generator[bytes]:
    """Yields the run's points, key by key in step order, from one consistent snapshot."""
    with transaction(factory, snapshot=True) as session:
        query = select(Series.id, Series.key).where(Series.run_id == run_id)
        if keys:
            query = query.where(Series.key.in_(keys))
        series = [(int(i), str(k)) for i, k in session.execute(query.order_by(Series.key)).all()]
        if session.get_bind().dialect.name == "postgresql" and fmt != "parquet":
            yield from _postgres_text(session, series, fmt)
            return
        yield from encode(fmt, _row_batches(session, series))


def encode(fmt: ExportFormat, batches: Iterator[tuple[str, pa.Table]]) -> Iterator[bytes]:
    """``(key, columns step/value/epoch/time)`` chunks as the bytes of the format."""
    if fmt == "parquet":
        yield from _parquet(batches)
        return
    if fmt == "csv":
        yield CSV_HEADER
    for key, table in batches:
        yield format_text(fmt, key, table)


# --- reading: PostgreSQL ----------------------------------------------------------------------------------------

# Each statement formats the next TEXT_ROWS_PER_CHUNK points of one series into one text value, in the server: one
# round trip and one Python object per chunk. (COPY ... TO STDOUT formats as fast, but libpq hands its data over a
# row at a time, and a million Python-level reads capped the export at ~400k points/s.) The key comes already
# spelled for the format (CSV-quoted or JSON-encoded, as the SQLite path spells it); NaN as the API spells it.
_PG_CSV_LINE = (
    "%(key)s::text || ',' || step || ',' || COALESCE(value::text, 'NaN') || ',' || COALESCE(epoch::text, '') "
    "|| ',' || time::text || E'\\n'"
)
_PG_JSONL_LINE = (
    "'{\"key\":' || %(key)s::text || ',\"step\":' || step || ',\"value\":' || "
    "CASE WHEN value IS NULL THEN '\"NaN\"' WHEN value = 'Infinity' THEN '\"Infinity\"' "
    "WHEN value = '-Infinity' THEN '\"-Infinity\"' ELSE value::text END || "
    "',\"epoch\":' || COALESCE(epoch::text, 'null') || ',\"time\":' || time::text || E'}\\n'"
)
_PG_CHUNK = (
    "SELECT string_agg(line, '' ORDER BY step), max(step) FROM ("
    "SELECT step, {line} AS line FROM metric_points WHERE series_id = %(series)s AND step > %(after)s "
    "ORDER BY step LIMIT %(limit)s) AS chunk"
)
TEXT_ROWS_PER_CHUNK = 50_000


def _postgres_text(session: Session, series: Sequence[tuple[int, str]], fmt: ExportFormat) -> Iterator[bytes]:
    driver = session.connection().connection.driver_connection
    assert driver is not None
    # float8 text is exact and shortest only at this setting (the default since PostgreSQL 12; a server may differ).
    session.connection().exec_driver_sql("SET LOCAL extra_float_digits = 1")
    if fmt == "csv":
        yield CSV_HEADER
    sql = _PG_CHUNK.format(line=_PG_CSV_LINE if fmt == "csv" else _PG_JSONL_LINE)
    with driver.cursor() as cursor:
        for series_id, key in series:
            params: dict[str, Any] = {
                "key": _csv_key(key) if fmt == "csv" else json.dumps(key),
                "series": series_id,
                "after": -1,
                "limit": TEXT_ROWS_PER_CHUNK,
            }
            while True:
                cursor.execute(sql, params)
                row = cursor.fetchone()
                if row is None or row[0] is None:
                    break
                yield row[0].encode()
                params["after"] = row[1]


# --- reading: rows, into Arrow columns (SQLite; Parquet on PostgreSQL) ---------------------------------------------
# Read through the session's own driver connection: a second SQLite library in the process (ADBC's driver bundles
# one) would share the database file's POSIX locks with this one's, which SQLite warns can corrupt a database.


_ROW = pa.struct([("step", pa.int64()), ("value", pa.float64()), ("epoch", pa.float64()), ("time", pa.float64())])


def _row_batches(session: Session, series: Sequence[tuple[int, str]]) -> Iterator[tuple[str, pa.Table]]:
    for series_id, key in series:
        after = -1
        while rows := points_in_range(session, series_id, after + 1, LAST_STEP, limit=CHUNK_ROWS):
            # The driver's row tuples straight into Arrow columns, in C (transposing them in Python took longer
            # than formatting the text); a stored NULL value is a NaN.
            table = pa.Table.from_struct_array(pa.array(rows, type=_ROW))
            value = table.schema.get_field_index("value")
            yield key, table.set_column(value, "value", pc.fill_null(table.column(value), float("nan")))
            after = rows[-1][0]


# --- writing ------------------------------------------------------------------------------------------------------


def _csv_key(key: str) -> str:
    if any(c in key for c in ',"\n\r'):
        return '"' + key.replace('"', '""') + '"'
    return key


def _number_text(column: Any, *, quoted_specials: bool) -> Any:
    """Shortest round-trip text of a float column; non-finite values spelled as the API spells them."""
    text = pc.cast(column, pa.string())
    if pc.all(pc.is_finite(column)).as_py() is not False:
        return text
    q = '"' if quoted_specials else ""
    for value, name in ((float("inf"), "Infinity"), (float("-inf"), "-Infinity")):
        text = pc.if_else(pc.equal(column, value), f"{q}{name}{q}", text)
    return pc.if_else(pc.is_nan(column), f"{q}NaN{q}", text)


def format_text(fmt: Literal["csv", "jsonl"] | ExportFormat, key: str, table: pa.Table) -> bytes:
    """One chunk of one key as CSV rows or JSON lines, formatted column-wise by Arrow."""
    steps = pc.cast(table["step"], pa.string())
    values = _number_text(table["value"], quoted_specials=fmt == "jsonl")
    times = pc.cast(table["time"], pa.string())
    epochs = pc.fill_null(pc.cast(table["epoch"], pa.string()), "" if fmt == "csv" else "null")
    if fmt == "csv":
        lines = pc.binary_join_element_wise(_csv_key(key), steps, values, epochs, times, ",")
    else:
        lines = pc.binary_join_element_wise(
            '{"key":' + json.dumps(key) + ',"step":',
            steps,
            ',"value":',
            values,
            ',"epoch":',
            epochs,
            ',"time":',
            times,
            "}",
            "",
        )
    lines = lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines), "\n")
    text: bytes = joined[0].as_buffer().to_pybytes()
    return text + b"\n"


class _Chunks(io.RawIOBase):
    """A write-only file that hands what was written to the exporter, chunk by chunk."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.size += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def _parquet(batches: Iterator[tuple[str, pa.Table]]) -> Iterator[bytes]:
    sink = _Chunks()
    with pq.ParquetWriter(sink, PARQUET_SCHEMA) as writer:  # a row group per chunk, the footer at the end
        for key, table in batches:
            keys = pa.repeat(pa.scalar(key, pa.string()), table.num_rows)
            writer.write_table(pa.Table.from_arrays([keys, *table.columns], schema=PARQUET_SCHEMA))
            if data := sink.take():
                yield data
    yield sink.take()
