"""The command channel over real HTTP: operators queue, workers fetch (long-poll) and acknowledge once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.db import make_engine, make_session_factory, transaction
from server.settings import Settings
from server.store.tokens import create_token
from tests.conftest import LiveServer, make_run


def queue(client: httpx.Client, run_id: int, **body: object) -> dict[str, Any]:
    response = client.post(f"/api/v1/runs/{run_id}/commands", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_fetch_marks_delivered_and_ack_applies_once(client: httpx.Client) -> None:
    run_id = make_run(client)
    first = queue(client, run_id, action="decay", factor=0.1, reason="plateau since step 900")
    second = queue(client, run_id, action="set_lr", lr=0.003)
    assert first["status"] == "approved"
    fetched = client.get(f"/api/v1/runs/{run_id}/commands").json()["data"]
    assert [(c["id"], c["action"], c["status"]) for c in fetched] == [
        (first["id"], "decay", "delivered"),
        (second["id"], "set_lr", "delivered"),
    ]
    assert [
        c["id"] for c in client.get(f"/api/v1/runs/{run_id}/commands", params={"after": first["id"]}).json()["data"]
    ] == [second["id"]]
    ack = {"status": "applied", "step": 1200, "lr": 0.01}
    done = client.post(f"/api/v1/runs/{run_id}/commands/{first['id']}/ack", json=ack)
    assert done.status_code == 200
    assert (done.json()["status"], done.json()["applied_step"], done.json()["applied_lr"]) == ("applied", 1200, 0.01)
    # A retried ack (lost response) is harmless; a different one is refused.
    assert client.post(f"/api/v1/runs/{run_id}/commands/{first['id']}/ack", json=ack).status_code == 200
    other = client.post(f"/api/v1/runs/{run_id}/commands/{first['id']}/ack", json={**ack, "step": 1300})
    assert other.status_code == 409
    assert "applied once" in other.json()["detail"]
    # Only the unacknowledged command is still pending.
    assert [c["id"] for c in client.get(f"/api/v1/runs/{run_id}/commands").json()["data"]] == [second["id"]]
    kinds = [e["kind"] for e in client.get(f"/api/v1/runs/{run_id}/events").json()["data"]]
    assert kinds.count("decision.approved") == 2
    assert kinds.count("decision.delivered") == 2
    assert kinds.count("decision.applied") == 1
    decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    assert [d["status"] for d in decisions] == ["applied", "delivered"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"action": "decay"}, "a decay command needs factor"),
        ({"action": "decay", "factor": 1.5}, "factor"),
        ({"action": "set_lr", "lr": 0.1, "factor": 0.5}, "factor does not apply to a set_lr command"),
        ({"action": "stop", "lr": 0.1}, "lr does not apply to a stop command"),
        ({"action": "explode"}, "action"),
    ],
)
def test_bad_commands_are_422(client: httpx.Client, body: dict[str, object], detail: str) -> None:
    run_id = make_run(client)
    response = client.post(f"/api/v1/runs/{run_id}/commands", json=body)
    assert response.status_code == 422
    assert detail in response.json()["detail"]
    assert client.get(f"/api/v1/runs/{run_id}/commands").json()["data"] == []


def test_unknown_run_or_command(client: httpx.Client) -> None:
    assert client.post("/api/v1/runs/99/commands", json={"action": "stop"}).status_code == 404
    assert client.get("/api/v1/runs/99/commands").status_code == 404
    run_id = make_run(client)
    missing = client.post(f"/api/v1/runs/{run_id}/commands/5/ack", json={"status": "applied", "step": 1})
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"run {run_id} has no command 5"


def test_long_poll_wakes_when_a_command_arrives(client: httpx.Client, server: LiveServer) -> None:
    run_id = make_run(client)
    result: dict[str, object] = {}

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            started = time.monotonic()
            result["data"] = http.get(f"/api/v1/runs/{run_id}/commands", params={"wait": 10}).json()["data"]
            result["seconds"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    created = queue(client, run_id, action="stop")
    poller.join(timeout=15)
    data = result["data"]
    assert isinstance(data, list) and [c["id"] for c in data] == [created["id"]]
    seconds = result["seconds"]
    assert isinstance(seconds, float) and seconds < 3  # woken, not timed out after 10 s
    empty_started = time.monotonic()
    assert (
        client.get(f"/api/v1/runs/{run_id}/commands", params={"wait": 1, "after": created["id"]}).json()["data"] == []
    )
    assert time.monotonic() - empty_started >= 0.9


def test_ingest_response_carries_pending_commands(client: httpx.Client) -> None:
    run_id = make_run(client)
    created = queue(client, run_id, action="decay", factor=0.5)
    batch = {"points": [{"key": "loss", "step": 1, "value": 1.0}]}
    response = client.post(f"/api/v1/runs/{run_id}/metrics", json=batch).json()
    assert [(c["id"], c["status"]) for c in response["commands"]] == [(created["id"], "delivered")]


@pytest.fixture
def secured(migrated_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    engine = make_engine(migrated_url)
    tokens: dict[str, str] = {}
    with transaction(make_session_factory(engine), write=True) as session:
        for role in ("viewer", "worker", "operator"):
            tokens[role] = create_token(session, name=role, role=role)[1]
    engine.dispose()
    with LiveServer(create_app(Settings(database_url=migrated_url, auth=True))) as live:
        yield live.url, tokens


def test_roles(secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[role]}"}

    with httpx.Client(base_url=url) as client:
        run_id = client.post("/api/v1/runs", json={}, headers=auth("worker")).json()["id"]
        body = {"action": "stop"}
        assert client.post(f"/api/v1/runs/{run_id}/commands", json=body, headers=auth("worker")).status_code == 403
        created = client.post(f"/api/v1/runs/{run_id}/commands", json=body, headers=auth("operator"))
        assert created.status_code == 201
        assert created.json()["actor"] == "token:operator"
        assert client.get(f"/api/v1/runs/{run_id}/commands", headers=auth("viewer")).status_code == 403
        assert len(client.get(f"/api/v1/runs/{run_id}/commands", headers=auth("worker")).json()["data"]) == 1
