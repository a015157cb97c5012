"""Metric ingestion, idempotency, conflicts, non-finite values, rewinds and export, over real HTTP."""

from __future__ import annotations

import csv
import io
import json
import math
import time

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from server.store import export
from tests.conftest import LiveServer, make_run, points


def series(client: httpx.Client, run_id: int, key: str, **params: int) -> dict[str, object]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics", params={"key": key, **params})
    assert response.status_code == 200, response.text
    found = [s for s in response.json()["series"] if s["key"] == key]
    assert len(found) == 1
    result: dict[str, object] = found[0]
    return result


def ingest(client: httpx.Client, run_id: int, batch: list[dict[str, object]]) -> httpx.Response:
    return client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": batch})


def test_ingest_and_read_back(client: httpx.Client) -> None:
    run_id = make_run(client)
    batch = [
        {"key": "loss", "step": 0, "value": 2.5, "epoch": 0.0, "time": 1_700_000_000.0},
        {"key": "loss", "step": 1, "value": 2.25, "epoch": 0.5, "time": 1_700_000_001.5},
        {"key": "acc", "step": 1, "value": 0.1},
    ]
    before = time.time()
    response = ingest(client, run_id, batch)
    assert response.status_code == 200
    assert response.json() == {"accepted": 3, "inserted": 3, "duplicates": 0, "commands": []}
    loss = series(client, run_id, "loss")
    assert loss["steps"] == [0, 1]
    assert loss["values"] == [2.5, 2.25]
    assert loss["epochs"] == [0.0, 0.5]
    assert loss["times"] == [1_700_000_000.0, 1_700_000_001.5]
    assert loss["downsampled"] is False
    acc = series(client, run_id, "acc")
    assert acc["epochs"] == [None]
    times = acc["times"]
    assert isinstance(times, list)
    assert before - 1 <= times[0] <= time.time() + 1  # arrival time when the worker sent none
    latest = client.get(f"/api/v1/runs/{run_id}").json()["latest"]
    assert latest["loss"]["step"] == 1
    assert latest["loss"]["value"] == 2.25
    assert latest["loss"]["count"] == 2
    assert latest["acc"]["value"] == 0.1


def test_non_finite_values_round_trip(client: httpx.Client) -> None:
    run_id = make_run(client)
    batch = [
        {"key": "loss", "step": 0, "value": 1.0},
        {"key": "loss", "step": 1, "value": "Infinity"},
        {"key": "loss", "step": 2, "value": "-Infinity"},
        {"key": "loss", "step": 3, "value": "NaN"},
    ]
    assert ingest(client, run_id, batch).status_code == 200
    assert series(client, run_id, "loss")["values"] == [1.0, "Infinity", "-Infinity", "NaN"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["latest"]["loss"]["value"] == "NaN"
    # An identical resend, NaN included, is a no-op; a number where NaN was stored is a conflict.
    assert ingest(client, run_id, batch).json() == {"accepted": 4, "inserted": 0, "duplicates": 4, "commands": []}
    assert ingest(client, run_id, [{"key": "loss", "step": 3, "value": 0.0}]).status_code == 409
    exported = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl"}).text
    assert [json.loads(line)["value"] for line in exported.splitlines()] == [
        1.0,
        "Infinity",
        "-Infinity",
        "NaN",
    ]


def test_resend_is_idempotent(client: httpx.Client) -> None:
    run_id = make_run(client)
    assert ingest(client, run_id, points("loss", range(100))).json()["inserted"] == 100
    again = ingest(client, run_id, points("loss", range(50, 150)))
    assert again.json() == {"accepted": 100, "inserted": 50, "duplicates": 50, "commands": []}
    assert series(client, run_id, "loss")["total_points"] == 150
    assert client.get(f"/api/v1/runs/{run_id}").json()["latest"]["loss"]["count"] == 150


def test_identical_duplicate_within_batch_counts_once(client: httpx.Client) -> None:
    run_id = make_run(client)
    batch = points("loss", range(3)) + points("loss", range(3))
    assert ingest(client, run_id, batch).json() == {"accepted": 6, "inserted": 3, "duplicates": 3, "commands": []}


def test_conflict_rejects_the_whole_batch(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, points("loss", range(10)))
    batch = [*points("loss", range(10, 20)), {"key": "loss", "step": 4, "value": 99.0}, *points("acc", range(5))]
    response = ingest(client, run_id, batch)
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "conflict"
    assert "points[10]" in body["detail"]
    assert "'loss' step 4" in body["detail"]
    assert body["conflicts"] == [
        {"index": 10, "where": "points[10]", "key": "loss", "step": 4, "stored": 0.504, "sent": 99.0}
    ]
    # All or nothing: neither the new loss points nor the new key were stored.
    listed = client.get(f"/api/v1/runs/{run_id}/metrics").json()["series"]
    assert [(s["key"], s["total_points"]) for s in listed] == [("loss", 10)]


def test_conflicting_duplicate_within_batch_is_422(client: httpx.Client) -> None:
    run_id = make_run(client)
    batch = [{"key": "loss", "step": 1, "value": 1.0}, {"key": "loss", "step": 1, "value": 2.0}]
    response = ingest(client, run_id, batch)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("points[1]: key 'loss' step 1 appears twice")
    assert client.get(f"/api/v1/runs/{run_id}/metrics").json()["series"] == []


def test_out_of_order_steps_fill_gaps(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, points("loss", range(0, 100, 2)))
    response = ingest(client, run_id, points("loss", range(1, 100, 2)))
    assert response.json()["inserted"] == 50
    assert series(client, run_id, "loss")["steps"] == list(range(100))
    assert client.get(f"/api/v1/runs/{run_id}").json()["latest"]["loss"]["step"] == 99


def test_rewind_replaces_points_and_keeps_them_recoverable(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, points("loss", range(100)) + points("acc", range(0, 100, 10)))
    response = client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 59, "reason": "resumed from ckpt-59"})
    assert response.status_code == 200
    result = response.json()
    assert result["removed"] == {"acc": 4, "loss": 40}
    # The resumed run logs steps 60.. again with different values: accepted, not a conflict.
    assert ingest(client, run_id, points("loss", range(60, 80), value=7.0)).json()["inserted"] == 20
    loss = series(client, run_id, "loss")
    assert loss["steps"] == list(range(80))
    values = loss["values"]
    assert isinstance(values, list)
    assert values[60] == 7.0 + 60e-3
    latest = client.get(f"/api/v1/runs/{run_id}").json()["latest"]
    assert (latest["loss"]["step"], latest["loss"]["count"]) == (79, 80)
    assert (latest["acc"]["step"], latest["acc"]["count"]) == (50, 6)
    event = client.get(f"/api/v1/runs/{run_id}/events/{result['event_id']}").json()
    assert event["kind"] == "metrics.rewound"
    assert event["payload"]["reason"] == "resumed from ckpt-59"
    old = event["payload"]["points"]["loss"]
    assert [p[0] for p in old] == list(range(60, 100))
    assert old[0][1] == 0.5 + 60e-3


def test_rewind_unknown_run_and_bad_step(client: httpx.Client) -> None:
    assert client.post("/api/v1/runs/77/rewind", json={"step": 1}).status_code == 404
    run_id = make_run(client)
    response = client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": -1})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("step")


def test_export_csv_and_jsonl(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(
        client,
        run_id,
        [*points("loss", range(25_000)), {"key": "a,b", "step": 3, "value": "NaN", "epoch": 1.0}],
    )
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert f"run-{run_id}-metrics.csv" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 25_001
    assert rows[0] == {"key": "a,b", "step": "3", "value": "NaN", "epoch": rows[0]["epoch"], "time": rows[0]["time"]}
    assert float(rows[0]["epoch"]) == 1.0  # shortest round-trip text: "1" or "1.0" depending on the engine
    loss = [r for r in rows if r["key"] == "loss"]
    assert [int(r["step"]) for r in loss] == list(range(25_000))
    assert all(float(r["value"]) == 0.5 + int(r["step"]) * 1e-3 for r in loss)  # full precision
    only = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl", "key": "a,b"})
    assert only.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in only.text.splitlines()]
    assert lines == [{"key": "a,b", "step": 3, "value": "NaN", "epoch": 1.0, "time": lines[0]["time"]}]
    assert client.get("/api/v1/runs/999/metrics/export").status_code == 404
    bad = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "xlsx"})
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("format")


def test_every_format_round_trips_every_value_exactly(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """CSV, JSON lines and Parquet give back exactly what was stored: NaN, infinities, the extremes of float64,
    values whose shortest text is long, missing epochs, and keys that need quoting; in order across the chunks the
    export reads (made small here: 3,000 points a key cross several). (Zero's sign is not kept: SQLite stores -0.0
    as 0.)"""
    monkeypatch.setattr(export, "CHUNK_ROWS", 700)  # the server runs in this process
    monkeypatch.setattr(export, "TEXT_ROWS_PER_CHUNK", 700)
    run_id = make_run(client)
    specials = ["NaN", "Infinity", "-Infinity", -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, 1e-7, 1e16, 3.0]
    sent = [
        {"key": key, "step": step, "value": value, "epoch": None if step % 3 else step / 7, "time": 1.7e9 + step / 9}
        for key in ('odd "key", with comma', "loss")
        for step, value in enumerate(specials * 300)
    ]
    assert ingest(client, run_id, sent).status_code == 200

    def canonical(value: object) -> object:  # NaN != NaN: compare NaN by name
        if isinstance(value, str):
            return value
        assert isinstance(value, float | int)
        return (
            "NaN"
            if math.isnan(value)
            else ("Infinity" if value == math.inf else ("-Infinity" if value == -math.inf else float(value)))
        )

    expected = sorted((p["key"], p["step"], (canonical(p["value"])), p["epoch"], p["time"]) for p in sent)
    csv_rows = list(csv.DictReader(io.StringIO(client.get(f"/api/v1/runs/{run_id}/metrics/export").text)))
    from_csv = [
        (
            r["key"],
            int(r["step"]),
            (canonical(float(r["value"]) if r["value"] not in specials else r["value"])),
            float(r["epoch"]) if r["epoch"] else None,
            float(r["time"]),
        )
        for r in csv_rows
    ]
    jsonl = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl"}).text.splitlines()
    from_jsonl = [(d["key"], d["step"], (canonical(d["value"])), d["epoch"], d["time"]) for d in map(json.loads, jsonl)]
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "parquet"})
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert f"run-{run_id}-metrics.parquet" in response.headers["content-disposition"]
    table = pq.read_table(io.BytesIO(response.content))
    assert table.schema.names == ["key", "step", "value", "epoch", "time"]
    assert str(table.schema.field("value").type) == "double"
    from_parquet = [(r["key"], r["step"], (canonical(r["value"])), r["epoch"], r["time"]) for r in table.to_pylist()]
    for exported in (from_csv, from_jsonl, from_parquet):
        assert len(exported) == len(sent)
        assert sorted(exported, key=repr) == sorted(expected, key=repr)
    for exported in (from_csv, from_jsonl, from_parquet):
        assert [r[:2] for r in exported] == sorted({(p["key"], p["step"]) for p in sent})  # key, then step order


def test_downsampling_keeps_spikes_nans_and_the_last_point(client: httpx.Client) -> None:
    run_id = make_run(client)
    n = 60_000
    batch = [{"key": "loss", "step": s, "value": math.sin(s / 500.0)} for s in range(n)]
    spikes = {7_777: 50.0, 31_013: -40.0, 45_001: 30.0}
    for step, value in spikes.items():
        batch[step]["value"] = value
    batch[52_222]["value"] = "NaN"
    assert ingest(client, run_id, batch).status_code == 200
    result = series(client, run_id, "loss", max_points=500)
    steps, values = result["steps"], result["values"]
    assert isinstance(steps, list) and isinstance(values, list)
    assert result["downsampled"] is True
    assert result["total_points"] == n
    assert len(steps) <= 500
    assert steps == sorted(steps)
    by_step = dict(zip(steps, values, strict=True))
    for step, value in spikes.items():
        assert by_step.get(step) == value
    assert by_step.get(52_222) == "NaN"
    assert steps[-1] == n - 1
    # Every returned point is a stored point with its stored value.
    for step, value in by_step.items():
        if step not in spikes and step != 52_222:
            assert value == math.sin(step / 500.0)

    zoomed = series(client, run_id, "loss", min_step=7_000, max_step=8_000, max_points=2000)
    assert zoomed["downsampled"] is False
    assert zoomed["steps"] == list(range(7_000, 8_001))


def test_series_query_validation(client: httpx.Client) -> None:
    run_id = make_run(client)
    bad = client.get(f"/api/v1/runs/{run_id}/metrics", params={"min_step": 10, "max_step": 5})
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("min_step")
    small = client.get(f"/api/v1/runs/{run_id}/metrics", params={"max_points": 2})
    assert small.status_code == 422
    assert small.json()["detail"].startswith("max_points")
    assert client.get("/api/v1/runs/999/metrics").status_code == 404


def test_export_abandoned_by_the_client_ends_its_transaction(server: LiveServer, client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, points("loss", range(60_000)))
    with (
        httpx.Client(base_url=server.url) as reader,
        reader.stream("GET", f"/api/v1/runs/{run_id}/metrics/export") as response,
    ):
        first = next(response.iter_bytes())
        assert first.startswith(b"key,step,value,epoch,time\n")
    # The server notices the disconnect, stops the producer and closes the read transaction: writes go on,
    # and (on Postgres) no connection is left idle inside a transaction.
    assert ingest(client, run_id, points("loss", range(60_000, 60_010))).status_code == 200
    engine = server.app.state.stagewatch.engine
    if engine.dialect.name == "postgresql":
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as connection:
                stuck = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                        "AND query LIKE '%metric_points%'"
                    )
                ).scalar_one()
            if stuck == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stuck == 0
    full = client.get(f"/api/v1/runs/{run_id}/metrics/export").text
    assert len(full.splitlines()) == 1 + 60_010
