"""Runs over real HTTP: create, get, list with filters and cursor pagination, update, heartbeats, staleness."""

from __future__ import annotations

import time

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, make_run


def test_create_and_read_run(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/runs",
        json={
            "name": "resnet",
            "project": "vision",
            "tags": ["baseline", "sgd"],
            "notes": "n",
            "config": {"lr": 0.1},
        },
    )
    assert response.status_code == 201
    created = response.json()
    assert created["id"] >= 1
    assert created["status"] == "running"
    fetched = client.get(f"/api/v1/runs/{created['id']}").json()
    assert fetched["name"] == "resnet"
    assert fetched["project"] == "vision"
    assert fetched["tags"] == ["baseline", "sgd"]
    assert fetched["config"] == {"lr": 0.1}
    assert fetched["latest"] == {}


def test_default_name_uses_id(client: httpx.Client) -> None:
    run = client.post("/api/v1/runs", json={}).json()
    assert run["name"] == f"run-{run['id']}"


def test_update_run_and_audit(client: httpx.Client) -> None:
    run_id = make_run(client, tags=["a"])
    response = client.patch(f"/api/v1/runs/{run_id}", json={"name": "renamed", "tags": ["b", "c"], "notes": "x"})
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["tags"], body["notes"]) == ("renamed", ["b", "c"], "x")
    finished = client.patch(f"/api/v1/runs/{run_id}", json={"status": "finished"}).json()
    assert finished["status"] == "finished"
    assert finished["ended_at"] is not None
    events = client.get(f"/api/v1/runs/{run_id}/events", params={"kind": "run.updated"}).json()["data"]
    assert [e["payload"]["after"] for e in events] == [
        {"status": "finished"},
        {"name": "renamed", "tags": ["b", "c"], "notes": "x"},
    ]
    assert events[1]["payload"]["before"] == {"name": "test", "notes": "", "tags": ["a"]}


def test_stale_cannot_be_set(client: httpx.Client) -> None:
    run_id = make_run(client)
    response = client.patch(f"/api/v1/runs/{run_id}", json={"status": "stale"})
    assert response.status_code == 422
    assert "status" in response.json()["detail"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "running"


def test_list_filters(client: httpx.Client) -> None:
    a = make_run(client, name="alpha-one", project="p1", tags=["x"])
    b = make_run(client, name="beta", project="p2", tags=["x", "y"])
    c = make_run(client, name="ALPHA two", project="p1")
    client.patch(f"/api/v1/runs/{c}", json={"status": "failed"})

    def ids(**params: str) -> list[int]:
        response = client.get("/api/v1/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["data"]]

    assert ids() == [c, b, a]
    assert ids(project="p1") == [c, a]
    assert ids(tag="x") == [b, a]
    assert ids(tag="y") == [b]
    assert ids(name="alpha") == [c, a]
    assert ids(name="%") == []
    assert ids(status="failed") == [c]
    assert ids(status="running", project="p1") == [a]


def test_cursor_pagination_is_stable(client: httpx.Client) -> None:
    created = [make_run(client, name=f"r{i}") for i in range(7)]
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/runs", params=params).json()
        pages += 1
        seen += [r["id"] for r in page["data"]]
        if pages == 1:
            make_run(client, name="created while paging")  # must not shift later pages
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(created, reverse=True)
    assert pages == 3


def test_bad_cursor_is_named(client: httpx.Client) -> None:
    response = client.get("/api/v1/runs", params={"cursor": "not-a-cursor"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cursor")


def test_stale_after_grace_and_alive_again(migrated_url: str) -> None:
    # A grace long enough for a loaded machine to read the run back in time; then wait for it to pass (polled,
    # no fixed sleep: a slow machine waits longer, never fails for it).
    settings = Settings(database_url=migrated_url, auth=False, heartbeat_grace_s=3)
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url) as client:
        run_id = make_run(client)
        assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "running"
        deadline = time.monotonic() + 60
        while client.get(f"/api/v1/runs/{run_id}").json()["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "stale"
        assert [r["id"] for r in client.get("/api/v1/runs", params={"status": "stale"}).json()["data"]] == [run_id]
        assert client.get("/api/v1/runs", params={"status": "running"}).json()["data"] == []
        assert client.post(f"/api/v1/runs/{run_id}/heartbeat").json()["status"] == "running"
        time.sleep(0.8)
        # Ingesting counts as a heartbeat too.
        client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": [{"key": "loss", "step": 0, "value": 1}]})
        assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "running"
        client.patch(f"/api/v1/runs/{run_id}", json={"status": "finished"})
        time.sleep(0.8)
        assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"tags": ["has space"]}, "tags[0]"),
        ({"tags": "notalist"}, "tags"),
        ({"unknown": 1}, "unknown"),
        ({"config": [1, 2]}, "config"),
    ],
)
def test_create_run_rejects_bad_fields(client: httpx.Client, body: dict[str, object], field: str) -> None:
    response = client.post("/api/v1/runs", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(field)
    assert client.get("/api/v1/runs").json()["data"] == []


def test_non_finite_config_rejected(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/runs", content=b'{"config": {"lr": NaN}}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "config.lr" in response.json()["detail"]


def test_unknown_run_is_404(client: httpx.Client) -> None:
    for method, path in [
        ("GET", "/api/v1/runs/999"),
        ("PATCH", "/api/v1/runs/999"),
        ("POST", "/api/v1/runs/999/heartbeat"),
    ]:
        response = client.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404
        assert response.json()["detail"] == "run 999 does not exist"
