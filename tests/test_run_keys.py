"""Idempotent run creation by a client-chosen key, over real HTTP; and the race between two creates, in the store."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, text

from server.db import make_engine, make_session_factory, transaction
from server.schemas import RunCreate
from server.store.runs import create_or_get_run
from tests.conftest import LiveServer


def run_ids(client: httpx.Client, **params: str) -> list[int]:
    response = client.get("/api/v1/runs", params=params)
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["data"]]


def test_same_key_again_returns_the_run_unchanged(client: httpx.Client) -> None:
    first = client.post("/api/v1/runs", json={"client_key": "job-7/attempt", "name": "first", "tags": ["a"]})
    assert first.status_code == 201, first.text
    run = first.json()
    assert run["client_key"] == "job-7/attempt"

    again = client.post(
        "/api/v1/runs", json={"client_key": "job-7/attempt", "name": "second", "tags": ["b"], "mode": "auto"}
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == run["id"]
    assert (again.json()["name"], again.json()["tags"], again.json()["mode"]) == ("first", ["a"], "observe")
    assert client.get(f"/api/v1/runs/{run['id']}").json()["name"] == "first"
    assert run_ids(client) == [run["id"]]
    events = client.get(f"/api/v1/runs/{run['id']}/events").json()["data"]
    assert [e["kind"] for e in events] == ["run.created"]
    assert events[0]["payload"]["client_key"] == "job-7/attempt"


def test_runs_without_a_key_are_never_merged(client: httpx.Client) -> None:
    a = client.post("/api/v1/runs", json={"name": "same"})
    b = client.post("/api/v1/runs", json={"name": "same"})
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]
    assert a.json()["client_key"] is None


def test_concurrent_creates_with_one_key_make_one_run(server: LiveServer, client: httpx.Client) -> None:
    start = threading.Barrier(20)

    def create(i: int) -> tuple[int, int]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            start.wait()
            response = http.post("/api/v1/runs", json={"client_key": "the-one", "name": f"try-{i}"})
            return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))
    codes = sorted(code for code, _ in results)
    assert codes == [200] * 19 + [201], results
    assert len({run_id for _, run_id in results}) == 1
    run_id = results[0][1]
    assert run_ids(client) == [run_id]
    created = client.get(f"/api/v1/runs/{run_id}/events", params={"kind": "run.created"}).json()["data"]
    assert len(created) == 1


def wait_for_lock_wait(engine: Engine) -> None:
    """Until another Postgres session waits on a lock (the second insert, on the unique index)."""
    deadline = time.monotonic() + 10
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second create never waited for the first")


def test_the_create_that_loses_the_race_returns_the_winner(migrated_url: str) -> None:
    """The second create misses the first one's uncommitted run, inserts, and then fails on the unique key
    once the first commits (Postgres; SQLite serialises the two writers instead). It must answer with the
    first run and leave its own transaction usable."""
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)
    second: list[tuple[int, bool]] = []

    def create_second() -> None:
        with transaction(sessions, write=True) as session:
            run, created = create_or_get_run(session, RunCreate(client_key="k", name="second"), actor="b")
            second.append((run.id, created))

    try:
        with transaction(sessions, write=True) as session:
            first, created = create_or_get_run(session, RunCreate(client_key="k", name="first"), actor="a")
            assert created
            thread = threading.Thread(target=create_second)
            thread.start()
            if engine.dialect.name == "postgresql":
                wait_for_lock_wait(engine)
            else:
                time.sleep(0.2)
        thread.join(timeout=30)
        assert second == [(first.id, False)]
        with transaction(sessions) as session:
            assert session.execute(text("SELECT count(*) FROM runs")).scalar() == 1
            assert session.execute(text("SELECT count(*) FROM events")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("key", ["", "k" * 201, "a\x00b", "a\nb", "tab\there", "del\x7f"])
def test_invalid_keys_are_422_naming_the_field(client: httpx.Client, key: str) -> None:
    response = client.post("/api/v1/runs", json={"client_key": key, "name": "x"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("client_key:")
    assert response.json()["errors"][0]["field"] == "client_key"
    assert run_ids(client) == []


@pytest.mark.parametrize("key", ["k" * 200, "ünï/cødé key ✓", "550e8400-e29b-41d4-a716-446655440000"])
def test_valid_keys_round_trip(client: httpx.Client, key: str) -> None:
    response = client.post("/api/v1/runs", json={"client_key": key})
    assert response.status_code == 201, response.text
    assert response.json()["client_key"] == key
    assert client.post("/api/v1/runs", json={"client_key": key}).json()["id"] == response.json()["id"]


def test_filter_by_client_key(client: httpx.Client) -> None:
    a = client.post("/api/v1/runs", json={"client_key": "a"}).json()["id"]
    b = client.post("/api/v1/runs", json={"client_key": "b"}).json()["id"]
    c = client.post("/api/v1/runs", json={}).json()["id"]
    assert run_ids(client) == [c, b, a]
    assert run_ids(client, client_key="a") == [a]
    assert run_ids(client, client_key="b") == [b]
    assert run_ids(client, client_key="nobody") == []
    bad = client.get("/api/v1/runs", params={"client_key": "a\x00"})
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("client_key")


def test_the_key_cannot_be_changed(client: httpx.Client) -> None:
    run_id = client.post("/api/v1/runs", json={"client_key": "fixed"}).json()["id"]
    response = client.patch(f"/api/v1/runs/{run_id}", json={"client_key": "other"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("client_key")
    assert client.get(f"/api/v1/runs/{run_id}").json()["client_key"] == "fixed"


def test_openapi_documents_both_answers(client: httpx.Client) -> None:
    post = client.get("/openapi.json").json()["paths"]["/api/v1/runs"]["post"]
    assert {"200", "201"} <= set(post["responses"])
    for code in ("200", "201"):
        schema = post["responses"][code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/RunPublic"}
