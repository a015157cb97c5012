"""The list of a run's rewinds, over real HTTP: what a resumed worker reads to learn which rewinds happened."""

from __future__ import annotations

import datetime as dt

import httpx

from tests.conftest import make_run, points

FIELDS = {"event_id", "step", "time", "actor", "reason", "removed"}


def ingest(client: httpx.Client, run_id: int, steps: range) -> None:
    batch = points("loss", steps) + points("lr", steps, value=0.1)
    response = client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": batch})
    assert response.status_code == 200, response.text


def rewind(client: httpx.Client, run_id: int, step: int, reason: str) -> dict[str, object]:
    response = client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": step, "reason": reason})
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def rewinds(client: httpx.Client, run_id: int, **params: int) -> list[dict[str, object]]:
    response = client.get(f"/api/v1/runs/{run_id}/rewinds", params=params)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"data"}
    data: list[dict[str, object]] = response.json()["data"]
    return data


def test_rewinds_oldest_first_without_points(client: httpx.Client) -> None:
    run_id = make_run(client)
    other = make_run(client)
    assert rewinds(client, run_id) == []
    ingest(client, run_id, range(10))
    ingest(client, other, range(10))
    first = rewind(client, run_id, 7, "resumed from ckpt-7")
    rewind(client, other, 3, "another run")
    ingest(client, run_id, range(8, 13))
    second = rewind(client, run_id, 5, "resumed from ckpt-5")

    listed = rewinds(client, run_id)
    assert [r["event_id"] for r in listed] == [first["event_id"], second["event_id"]]
    for row in listed:
        assert set(row) == FIELDS  # the archived points stay in the audit event
    assert [(r["step"], r["reason"], r["removed"]) for r in listed] == [
        (7, "resumed from ckpt-7", {"loss": 2, "lr": 2}),
        (5, "resumed from ckpt-5", {"loss": 7, "lr": 7}),
    ]
    # Time and actor are the audit event's, in the same format.
    event = client.get(f"/api/v1/runs/{run_id}/events/{first['event_id']}").json()
    assert (listed[0]["time"], listed[0]["actor"]) == (event["created_at"], event["actor"])
    assert dt.datetime.fromisoformat(str(listed[0]["time"])).tzinfo is not None
    assert "points" in event["payload"]


def test_after_keeps_only_later_rewinds(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, range(10))
    first = rewind(client, run_id, 8, "one")
    second = rewind(client, run_id, 4, "two")
    assert [r["event_id"] for r in rewinds(client, run_id, after=0)] == [first["event_id"], second["event_id"]]
    assert [r["event_id"] for r in rewinds(client, run_id, after=int(str(first["event_id"])))] == [second["event_id"]]
    assert rewinds(client, run_id, after=int(str(second["event_id"]))) == []
    assert rewinds(client, run_id, after=2**31 - 1) == []


def test_a_rewind_that_removed_nothing_is_listed(client: httpx.Client) -> None:
    run_id = make_run(client)
    ingest(client, run_id, range(3))
    rewind(client, run_id, 100, "")
    assert [(r["step"], r["reason"], r["removed"]) for r in rewinds(client, run_id)] == [(100, "", {})]


def test_unknown_run_is_404_and_bad_after_is_422(client: httpx.Client) -> None:
    missing = client.get("/api/v1/runs/4242/rewinds")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "run 4242 does not exist"
    run_id = make_run(client)
    for bad in ("-1", "x", str(2**31)):
        response = client.get(f"/api/v1/runs/{run_id}/rewinds", params={"after": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["detail"].startswith("after")


def test_viewers_may_read_rewinds(secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    with httpx.Client(base_url=url) as client:
        worker = {"Authorization": f"Bearer {tokens['worker']}"}
        run_id = client.post("/api/v1/runs", json={}, headers=worker).json()["id"]
        client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 0}, headers=worker)
        assert client.get(f"/api/v1/runs/{run_id}/rewinds").status_code == 401
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
        listed = client.get(f"/api/v1/runs/{run_id}/rewinds", headers=viewer)
        assert listed.status_code == 200
        assert [r["actor"] for r in listed.json()["data"]] == ["token:worker-token"]
