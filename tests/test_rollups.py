"""The multi-resolution rollups stay equal to a rebuild from raw points, and downsampling keeps extremes."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from server.db import make_engine, make_session_factory, transaction
from server.models import MetricRollup, Series
from server.schemas import PointIn, RunCreate
from server.store import rollups
from server.store.metrics import ingest, rewind
from server.store.runs import create_run, get_run
from server.store.series import query_series

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)


@pytest.fixture
def sessions(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(migrated_url)
    yield make_session_factory(engine)
    engine.dispose()


def snapshot(session: Session, series_id: int) -> list[tuple[object, ...]]:
    r = MetricRollup
    rows = session.execute(
        select(
            r.level,
            r.bucket,
            r.count,
            r.nan_count,
            r.nan_step,
            r.min_step,
            r.min_value,
            r.max_step,
            r.max_value,
        )
        .where(r.series_id == series_id)
        .order_by(r.level, r.bucket)
    )
    return [tuple(row) for row in rows]


def random_value(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.02:
        return math.nan
    if roll < 0.03:
        return math.inf
    return rng.gauss(0, 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_rollups_equal_a_rebuild(sessions: sessionmaker[Session], seed: int) -> None:
    rng = random.Random(seed)
    with transaction(sessions, write=True) as session:
        run_id = create_run(session, RunCreate(name="r"), actor="test").id
    steps = list(range(0, 40_000, 3))
    rng.shuffle(steps)  # out of order, across rollup buckets at every level
    values = {s: random_value(rng) for s in steps}
    for i in range(0, len(steps), 2_000):
        chunk = steps[i : i + 2_000] + steps[max(0, i - 100) : i]  # with resent duplicates
        batch: list[PointIn] = [{"key": "loss", "step": s, "value": values[s]} for s in chunk]
        with transaction(sessions, write=True) as session:
            ingest(session, get_run(session, run_id), batch)
        if i == 20_000:
            with transaction(sessions, write=True) as session:
                rewind(session, get_run(session, run_id), 25_001, reason="", actor="test")
    with transaction(sessions, write=True) as session:
        series_id = session.scalars(select(Series.id).where(Series.run_id == run_id)).one()
        incremental = snapshot(session, series_id)
        rollups.rebuild_all(session, [series_id])
        rebuilt = snapshot(session, series_id)
    assert len(incremental) > 100
    assert incremental == rebuilt


def test_downsampled_ranges_keep_every_extreme(sessions: sessionmaker[Session]) -> None:
    rng = random.Random(7)
    n = 120_000
    values = [math.sin(s / 900.0) + rng.gauss(0, 0.05) for s in range(n)]
    with transaction(sessions, write=True) as session:
        run = create_run(session, RunCreate(name="r"), actor="test")
        ingest(session, run, [{"key": "loss", "step": s, "value": v} for s, v in enumerate(values)])
    with transaction(sessions) as session:
        series = session.scalars(select(Series).where(Series.run_id == run.id)).one()
        for _ in range(25):
            lo = rng.randrange(0, n - 10)
            hi = rng.randrange(lo + 1, n)
            max_points = rng.choice([50, 301, 2000])
            out = query_series(session, series, min_step=lo, max_step=hi, max_points=max_points)
            window = values[lo : hi + 1]
            assert out.total_points == len(window)
            assert len(out.steps) <= max_points
            assert out.steps == sorted(set(out.steps))
            got = dict(zip(out.steps, out.values, strict=True))
            assert all(got[s] == values[s] for s in got)  # real points, exact values
            assert got.get(lo + window.index(max(window))) == max(window)
            assert got.get(lo + window.index(min(window))) == min(window)
            assert out.steps[-1] == hi  # the last point is always kept
            if len(window) > max_points:
                assert out.downsampled
                # Buckets are evenly spread: no gap between kept points is much wider than a bucket.
                bucket = len(window) / ((max_points - 1) // 2)
                assert max(b - a for a, b in zip(out.steps, out.steps[1:], strict=False)) <= 2.5 * bucket
