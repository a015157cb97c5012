"""trainer.columns: the log() buffer keeps every point once, in order, and leaves nothing for the GC to count."""

from __future__ import annotations

import gc
import json
import math
import random
import threading
from typing import Any

import pytest

from trainer.columns import Columns


def _add(columns: Columns, keys: tuple[str, ...], step: int, values: list[float], epoch: float = math.nan) -> None:
    block = columns.block(keys)
    block.steps.append(step)
    block.rows.fromlist([epoch, 1.7e9 + step, *values])
    columns.calls += 1


def _ids(points: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(p["key"], p["step"]) for p in points]


def _three_rows() -> Columns:
    columns = Columns()
    _add(columns, ("loss", "lr"), 3, [math.nan, math.inf], epoch=0.5)
    _add(columns, ("loss", "lr"), 4, [-math.inf, 0.1])
    _add(columns, ("acc",), 4, [0.9], epoch=1.0)
    _add(columns, ("step_time",), 4, [0.01])
    return columns


def test_wire_form_of_every_kind_of_value() -> None:
    body = json.loads(_three_rows().encode())
    assert body == {
        "tables": [
            {
                "keys": ["loss", "lr"],
                "steps": [3, 4],
                "values": [["NaN", "-Infinity"], ["Infinity", 0.1]],
                "epochs": [0.5, None],
                "times": [1.7e9 + 3, 1.7e9 + 4],
            },
            {"keys": ["acc"], "steps": [4], "values": [[0.9]], "epochs": [1.0], "times": [1.7e9 + 4]},
            {"keys": ["step_time"], "steps": [4], "values": [[0.01]], "times": [1.7e9 + 4]},  # no epoch at all
        ]
    }


def test_spool_form_of_every_kind_of_value() -> None:
    assert _three_rows().to_points() == [
        {"key": "loss", "step": 3, "value": "NaN", "time": 1.7e9 + 3, "epoch": 0.5},
        {"key": "lr", "step": 3, "value": "Infinity", "time": 1.7e9 + 3, "epoch": 0.5},
        {"key": "loss", "step": 4, "value": "-Infinity", "time": 1.7e9 + 4},
        {"key": "lr", "step": 4, "value": 0.1, "time": 1.7e9 + 4},
        {"key": "acc", "step": 4, "value": 0.9, "time": 1.7e9 + 4, "epoch": 1.0},
        {"key": "step_time", "step": 4, "value": 0.01, "time": 1.7e9 + 4},
    ]


@pytest.mark.parametrize("seed", range(20))
def test_cut_and_extend_keep_every_point_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    key_sets = [("a",), ("a", "b"), ("c", "d", "e")]
    whole = Columns()
    for step in range(rng.randrange(1, 300)):
        keys = rng.choice(key_sets)
        _add(whole, keys, step, [rng.random() for _ in keys])
    # Rebuild it as the sender does: chunks merged, then taken in cuts of random sizes.
    expected = whole.to_points()
    assert whole.points == len(expected)
    rest, taken = whole, []
    while rest:
        head, rest = rest.cut(rng.randrange(1, 50))
        assert head.points > 0 and head.points == len(head.to_points())
        taken += head.to_points()
    assert sorted(_ids(taken)) == sorted(_ids(expected))
    merged = Columns()
    for part in (whole.cut(7)[0], whole.cut(7)[1]):
        merged.extend(part)
    assert merged.to_points() == expected


def test_a_cut_never_passes_n_by_a_row_or_more() -> None:
    columns = Columns()
    for step in range(10):
        _add(columns, ("a", "b", "c"), step, [1.0, 2.0, 3.0])
    head, tail = columns.cut(7)
    assert (head.points, tail.points) == (6, 24)
    head, tail = columns.cut(1)  # at least one row, so that taking always makes progress
    assert (head.points, tail.points) == (3, 27)


def test_logging_creates_no_object_the_collector_counts() -> None:
    columns = Columns()
    lock = threading.Lock()
    values = {"train/loss": 0.5, "lr": 0.1}
    _add(columns, tuple(values), 0, list(values.values()))  # the block exists, as after the first call
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for step in range(1, 5000):
            keys = tuple(values)
            lock.acquire()
            try:
                block = columns.blocks[keys]
                block.steps.append(step)
                block.rows.fromlist([0.0, 1.7e9, *values.values()])
            finally:
                lock.release()
        assert gc.get_count()[0] - before < 50  # temporaries are freed (and uncounted) at once
    finally:
        gc.enable()
