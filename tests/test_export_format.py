"""The column-wise (Arrow) export formatter: every value reads back exactly, non-finite values are spelled as the
API spells them, keys are quoted or escaped as their format needs."""

from __future__ import annotations

import csv
import io
import json
import math
import random

import pyarrow as pa
import pytest

from server.store.export import format_text

Row = tuple[int, float, float | None, float]


def sample_rows(seed: int, *, with_epochs: bool) -> list[Row]:
    rng = random.Random(seed)
    rows: list[Row] = []
    for step in range(0, 5000, 7):
        value = rng.choice([rng.gauss(0, 1), rng.uniform(-1e-9, 1e-9), rng.uniform(1e15, 1e17), 0.1, 1.0, 5e-324])
        epoch = step / 100 if with_epochs and rng.random() < 0.7 else None
        rows.append((step, value, epoch, 1.7e9 + step * 0.013))
    return rows


def table(rows: list[Row]) -> pa.Table:
    steps, values, epochs, times = zip(*rows, strict=True)
    return pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "value": pa.array(values, pa.float64()),
            "epoch": pa.array(epochs, pa.float64()),
            "time": pa.array(times, pa.float64()),
        }
    )


def parse(fmt: str, data: bytes) -> list[tuple[object, ...]]:
    if fmt == "csv":
        return [
            (r["key"], int(r["step"]), float(r["value"]), float(r["epoch"]) if r["epoch"] else None, float(r["time"]))
            for r in csv.DictReader(io.StringIO("key,step,value,epoch,time\n" + data.decode()))
        ]
    return [
        (d["key"], d["step"], float(d["value"]), d["epoch"], d["time"])
        for d in map(json.loads, data.decode().splitlines())
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("with_epochs", [True, False])
@pytest.mark.parametrize("key", ['odd "key", with comma', "line\nbreak", "plain/loss", "ünïcode ✓"])
def test_every_value_reads_back_exactly(fmt: str, with_epochs: bool, key: str) -> None:
    rows = sample_rows(3, with_epochs=with_epochs)
    assert parse(fmt, format_text(fmt, key, table(rows))) == [(key, s, v, e, t) for s, v, e, t in rows]  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_non_finite_values_are_spelled_out(fmt: str) -> None:
    rows: list[Row] = [
        (0, 1.5, None, 1.0),
        (1, math.nan, None, 2.0),
        (2, math.inf, 0.5, 3.0),
        (3, -math.inf, None, 4.0),
    ]
    text = format_text(fmt, "loss", table(rows)).decode()  # type: ignore[arg-type]
    if fmt == "csv":
        assert text.splitlines() == ["loss,0,1.5,,1", "loss,1,NaN,,2", "loss,2,Infinity,0.5,3", "loss,3,-Infinity,,4"]
    else:
        assert [json.loads(line)["value"] for line in text.splitlines()] == [1.5, "NaN", "Infinity", "-Infinity"]
        assert [json.loads(line)["epoch"] for line in text.splitlines()] == [None, None, 0.5, None]
