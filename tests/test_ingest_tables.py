"""The column-wise form of ``POST /runs/{id}/metrics`` (``{"tables": [...]}``), over real HTTP on both engines:
it stores exactly what the same points in the ``points`` form store, and a malformed table is refused with the
place named and nothing stored."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import make_run

TIMES = [1_700_000_000.0, 1_700_000_001.25, None, 1_700_000_003.5]
STEPS = [0, 1, 2, 3]
LOSS: list[Any] = [2.5, "NaN", "Infinity", 0.125]
LR: list[Any] = [0.1, 0.1, "-Infinity", 1e-300]


def table(**fields: Any) -> dict[str, Any]:
    base = {"keys": ["loss", "lr"], "steps": STEPS, "values": [LOSS, LR], "epochs": [0.0, None, 0.5, 0.75]}
    base["times"] = TIMES
    return {**base, **fields}


def as_points(t: dict[str, Any]) -> list[dict[str, Any]]:
    """The same points in the ``points`` form."""
    out = []
    for k, key in enumerate(t["keys"]):
        for r, step in enumerate(t["steps"]):
            point = {"key": key, "step": step, "value": t["values"][k][r]}
            if t.get("epochs") is not None:
                point["epoch"] = t["epochs"][r]
            if t.get("times") is not None:
                point["time"] = t["times"][r]
            out.append(point)
    return out


def post(client: httpx.Client, run_id: int, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"/api/v1/runs/{run_id}/metrics", json=body)


def exported(client: httpx.Client, run_id: int) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl"})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_tables_store_what_the_same_points_store(client: httpx.Client) -> None:
    as_tables, as_list = make_run(client), make_run(client)
    before = time.time()
    # Two tables, the second with another key set and no epochs or times at all.
    second = {"keys": ["acc"], "steps": [1, 3], "values": [[0.5, 0.75]]}
    response = post(client, as_tables, {"tables": [table(), second]})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 10, "inserted": 10, "duplicates": 0, "commands": []}
    assert post(client, as_list, {"points": as_points(table()) + as_points(second)}).status_code == 200

    got, want = exported(client, as_tables), exported(client, as_list)
    arrival = [p for p in got if p["time"] is not None and p["time"] >= before - 1]
    assert len(arrival) == 4  # step 2 of loss and lr, both acc points: stamped on arrival
    strip = [{**p, "time": None} if p in arrival else p for p in got]
    strip_want = [{**p, "time": None} if p["time"] >= before - 1 else p for p in want]
    assert strip == strip_want
    by_key = {(p["key"], p["step"]): p for p in got}
    assert by_key[("loss", 1)]["value"] == "NaN"
    assert by_key[("loss", 2)]["value"] == "Infinity"
    assert by_key[("lr", 2)]["value"] == "-Infinity"
    assert by_key[("lr", 3)]["value"] == 1e-300
    assert by_key[("loss", 1)]["epoch"] is None
    assert by_key[("loss", 3)] == {"key": "loss", "step": 3, "value": 0.125, "epoch": 0.75, "time": TIMES[3]}
    latest = client.get(f"/api/v1/runs/{as_tables}").json()["latest"]
    assert latest["loss"]["count"] == 4 and latest["acc"]["count"] == 2


def test_a_resend_is_all_duplicates_and_a_changed_value_names_its_place(client: httpx.Client) -> None:
    run_id = make_run(client)
    assert post(client, run_id, {"tables": [table()]}).status_code == 200
    again = post(client, run_id, {"tables": [table()]})
    assert again.json() == {"accepted": 8, "inserted": 0, "duplicates": 8, "commands": []}

    changed = table(values=[LOSS, [0.1, 0.1, "-Infinity", 7.0]])
    response = post(client, run_id, {"tables": [{"keys": ["acc"], "steps": [9], "values": [[1.0]]}, changed]})
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["detail"].startswith("tables[1].values[1][3]: key 'lr' step 3 is already stored with value 1e-300")
    assert body["conflicts"] == [
        {"index": 8, "where": "tables[1].values[1][3]", "key": "lr", "step": 3, "stored": 1e-300, "sent": 7.0}
    ]
    keys = {p["key"] for p in exported(client, run_id)}
    assert keys == {"loss", "lr"}  # all or nothing: acc of the refused batch was not stored


def test_the_same_key_in_two_tables_is_one_series(client: httpx.Client) -> None:
    run_id = make_run(client)
    body = {
        "tables": [
            {"keys": ["loss"], "steps": [5, 6], "values": [[1.0, 2.0]]},
            {"keys": ["loss", "acc"], "steps": [6, 7], "values": [[2.0, 3.0], [0.5, 0.6]]},
        ]
    }
    response = post(client, run_id, body)
    assert response.status_code == 200, response.text
    assert response.json()["inserted"] == 5 and response.json()["duplicates"] == 1  # loss step 6, sent twice alike
    loss = [(p["step"], p["value"]) for p in exported(client, run_id) if p["key"] == "loss"]
    assert loss == [(5, 1.0), (6, 2.0), (7, 3.0)]

    clash = {
        "tables": [{"keys": ["x"], "steps": [1], "values": [[1.0]]}, {"keys": ["x"], "steps": [1], "values": [[2]]}]
    }
    response = post(client, run_id, clash)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(
        "tables[1].values[0][0]: key 'x' step 1 appears twice in the batch with different values "
        "(tables[0].values[0][0]"
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, 'body: expected {"points": [...]} or {"tables": [...]}'),
        ({"points": [], "tables": []}, 'body: send either "points" or "tables", not both'),
        ({"tables": [table(keys=["loss", "loss"])]}, "tables[0].keys: 'loss' appears twice"),
        ({"tables": [table(values=[LOSS])]}, "tables[0].values: 1 lists for 2 keys"),
        ({"tables": [table(values=[LOSS, LR[:3]])]}, "tables[0].values[1]: 3 values for 4 steps"),
        ({"tables": [table(epochs=[0.0])]}, "tables[0].epochs: 1 entries for 4 steps"),
        ({"tables": [table(times=[*TIMES, 1.0])]}, "tables[0].times: 5 entries for 4 steps"),
        ({"tables": [table(keys=[])]}, "tables[0].keys: List should have at least 1 item"),
        ({"tables": [table(steps=[0, 1, -2, 3])]}, "tables[0].steps[2]: Input should be greater than or equal to 0"),
        ({"tables": [table(values=[LOSS, [0.1, "nan", 0.1, 0.1]])]}, "tables[0].values[1][1]"),
        ({"tables": [table(epochs=[0.0, 0.1, -1.0, 0.2])]}, "tables[0].epochs[2]"),
        ({"tables": [table(keys=["loss", "a\x00b"])]}, "tables[0].keys[1]"),
        ({"tables": [table(colour="red")]}, "tables[0].colour: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_table_is_refused_naming_it_and_nothing_is_stored(
    client: httpx.Client, body: dict[str, Any], detail: str
) -> None:
    run_id = make_run(client)
    assert post(client, run_id, {"points": [{"key": "kept", "step": 0, "value": 1.0}]}).status_code == 200
    response = post(client, run_id, body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid"
    assert response.json()["detail"].startswith(detail), response.json()["detail"]
    assert [(p["key"], p["step"]) for p in exported(client, run_id)] == [("kept", 0)]


def test_the_batch_limit_counts_every_key_of_every_row(client: httpx.Client) -> None:
    run_id = make_run(client)
    rows = 50_001  # x 2 keys: over the default limit of 100,000 points per batch
    body = {"tables": [{"keys": ["a", "b"], "steps": list(range(rows)), "values": [[0.5] * rows, [0.25] * rows]}]}
    response = post(client, run_id, body)
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == "tables: 100002 points in one batch, the limit is 100000; split the batch"
    assert exported(client, run_id) == []
