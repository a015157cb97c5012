"""The fast (column-wise, orjson) and the row-by-row export formatters agree on every value."""

from __future__ import annotations

import csv
import io
import json
import math
import random

import pytest

from server.store.export import _format_rows_slowly, format_rows
from server.store.points import PointRow


def sample_rows(seed: int, *, with_epochs: bool) -> list[PointRow]:
    rng = random.Random(seed)
    rows: list[PointRow] = []
    for step in range(0, 5000, 7):
        value = rng.choice([rng.gauss(0, 1), rng.uniform(-1e-9, 1e-9), rng.uniform(1e15, 1e17), 0.1, -0.0, 1.0])
        epoch = step / 100 if with_epochs and rng.random() < 0.7 else None
        rows.append((step, value, epoch, 1.7e9 + step * 0.013))
    return rows


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
def test_fast_path_matches_row_by_row(fmt: str, with_epochs: bool) -> None:
    rows = sample_rows(3, with_epochs=with_epochs)
    key = 'odd "key", with comma'
    fast = format_rows(fmt, key, rows)  # type: ignore[arg-type]
    slow = _format_rows_slowly(fmt, key, rows)  # type: ignore[arg-type]
    assert parse(fmt, fast) == parse(fmt, slow)
    assert [(r[0], r[1], r[2], r[3]) for r in parse(fmt, fast)] == [(key, s, v, e) for s, v, e, _ in rows]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_non_finite_values_are_spelled_out(fmt: str) -> None:
    rows: list[PointRow] = [
        (0, 1.5, None, 1.0),
        (1, None, None, 2.0),
        (2, math.inf, 0.5, 3.0),
        (3, -math.inf, None, 4.0),
    ]
    text = format_rows(fmt, "loss", rows).decode()  # type: ignore[arg-type]
    if fmt == "csv":
        assert text.splitlines() == [
            "loss,0,1.5,,1.0",
            "loss,1,NaN,,2.0",
            "loss,2,Infinity,0.5,3.0",
            "loss,3,-Infinity,,4.0",
        ]
    else:
        assert [json.loads(line)["value"] for line in text.splitlines()] == [1.5, "NaN", "Infinity", "-Infinity"]
