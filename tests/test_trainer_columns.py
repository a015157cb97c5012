"""trainer.columns: the log() buffer keeps every point once, in order, and leaves nothing for the GC to count;
the lock-free recorder hands every row to exactly one taker while a writer appends."""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import threading
from typing import Any

import pytest

from trainer.columns import MAX_STEP, Columns, Recorder


def _add(columns: Columns, keys: tuple[str, ...], step: int, values: list[float], epoch: float = math.nan) -> None:
    columns.block(keys).append(step, epoch, 1.7e9 + step, values)


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
    recorder = Recorder(wake_rows=10**9, max_rows=10**9)
    values = {"train/loss": 0.5, "lr": 0.1}
    recorder.block(tuple(values))  # the block exists, as after the first call
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for step in range(1, 5000):  # what Run.log does once the keys are known
            block = recorder.blocks[tuple(values)]
            block.rows.fromlist([step, 0.0, 1.7e9, *values.values()])
        assert gc.get_count()[0] - before < 50  # temporaries are freed (and uncounted) at once
    finally:
        gc.enable()
    assert len(recorder.take().blocks[("train/loss", "lr")]) == 4999


def test_steps_up_to_max_step_are_exact() -> None:
    columns = Columns()
    for step in (0, 1, MAX_STEP - 1, MAX_STEP):
        _add(columns, ("a",), step, [1.0])
    assert json.loads(columns.encode())["tables"][0]["steps"] == [0, 1, MAX_STEP - 1, MAX_STEP]
    assert [p["step"] for p in columns.to_points()] == [0, 1, MAX_STEP - 1, MAX_STEP]


@pytest.mark.parametrize("takers", [1, 4])
def test_recorder_hands_every_row_to_exactly_one_taker_while_writers_append(takers: int) -> None:
    """Writers append without a lock while takers empty the blocks (the sender thread; log() on overflow): a
    short switch interval makes the threads interleave at almost every bytecode, where a torn row, a lost one
    or one taken twice would show."""
    recorder = Recorder(wake_rows=10**9, max_rows=10**9)
    key_sets = [("a",), ("b", "c"), ("d", "e", "f")]
    writers, per_writer = 3, 20_000
    taken: list[Columns] = []
    done = threading.Event()

    def write(w: int) -> None:
        for i in range(per_writer):
            keys = key_sets[(w + i) % len(key_sets)]
            step = w * per_writer + i
            recorder.append(keys, [step, float(i), 1.7e9, *[float(step)] * len(keys)])

    def take() -> None:
        while not done.is_set():
            taken.append(recorder.take())
        taken.append(recorder.take())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        taking = [threading.Thread(target=take) for _ in range(takers)]
        for t in taking + threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        for t in taking:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not recorder
    merged = Columns()
    for part in taken:
        merged.extend(part)
    points = merged.to_points()
    seen = sorted(p["step"] for p in points if p["key"] in ("a", "b", "d"))
    assert seen == list(range(writers * per_writer))  # every row once
    assert all(p["value"] == float(p["step"]) for p in points)  # no row torn: its values are its own
    assert sum(1 for part in taken if part) > 1  # the takers did run while the writers wrote
