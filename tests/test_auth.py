"""Bearer tokens and roles, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from server.app import create_app
from server.db import make_engine, make_session_factory, transaction
from server.settings import Settings
from server.store.tokens import create_token, revoke_token
from tests.conftest import LiveServer


@pytest.fixture
def secured(migrated_url: str) -> Iterator[tuple[str, dict[str, str], dict[str, int]]]:
    """A server with auth on, and one token per role."""
    engine = make_engine(migrated_url)
    tokens: dict[str, str] = {}
    ids: dict[str, int] = {}
    with transaction(make_session_factory(engine), write=True) as session:
        for role in ("viewer", "worker", "operator"):
            row, tokens[role] = create_token(session, name=f"{role}-token", role=role)
            ids[role] = row.id
    settings = Settings(database_url=migrated_url, auth=True)
    with LiveServer(create_app(settings)) as live:
        yield live.url, tokens, ids
    engine.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_requests_without_a_valid_token_are_401(secured: tuple[str, dict[str, str], dict[str, int]]) -> None:
    url, _, _ = secured
    with httpx.Client(base_url=url) as client:
        missing = client.get("/api/v1/runs")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in missing.json()["detail"]
        wrong = client.get("/api/v1/runs", headers=bearer("sw_not-a-token"))
        assert wrong.status_code == 401
        assert wrong.json()["detail"] == "invalid or revoked token"
        assert client.get("/healthz").status_code == 200


def test_roles(secured: tuple[str, dict[str, str], dict[str, int]]) -> None:
    url, tokens, _ = secured
    with httpx.Client(base_url=url) as client:
        denied = client.post("/api/v1/runs", json={}, headers=bearer(tokens["viewer"]))
        assert denied.status_code == 403
        assert denied.json()["detail"] == "this needs the worker role; the token has viewer"
        created = client.post("/api/v1/runs", json={"name": "w"}, headers=bearer(tokens["worker"]))
        assert created.status_code == 201
        run_id = created.json()["id"]
        batch = {"points": [{"key": "loss", "step": 0, "value": 1.0}]}
        assert (
            client.post(f"/api/v1/runs/{run_id}/metrics", json=batch, headers=bearer(tokens["viewer"])).status_code
            == 403
        )
        assert (
            client.post(f"/api/v1/runs/{run_id}/metrics", json=batch, headers=bearer(tokens["worker"])).status_code
            == 200
        )
        assert (
            client.post(f"/api/v1/runs/{run_id}/metrics", json=batch, headers=bearer(tokens["operator"])).status_code
            == 200
        )
        listed = client.get("/api/v1/runs", headers=bearer(tokens["viewer"]))
        assert [r["id"] for r in listed.json()["data"]] == [run_id]
        # The audit log names who did it.
        events = client.get(f"/api/v1/runs/{run_id}/events", headers=bearer(tokens["viewer"])).json()["data"]
        assert events[-1]["actor"] == "token:worker-token"


def test_revoked_token_stops_working(secured: tuple[str, dict[str, str], dict[str, int]], migrated_url: str) -> None:
    url, tokens, ids = secured
    with httpx.Client(base_url=url) as client:
        assert client.get("/api/v1/runs", headers=bearer(tokens["viewer"])).status_code == 200
        engine = make_engine(migrated_url)
        with transaction(make_session_factory(engine), write=True) as session:
            assert revoke_token(session, ids["viewer"])
        engine.dispose()
        assert client.get("/api/v1/runs", headers=bearer(tokens["viewer"])).status_code == 401


def test_tokens_are_stored_hashed(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with transaction(make_session_factory(engine), write=True) as session:
        row, plaintext = create_token(session, name="t", role="worker")
        assert plaintext.startswith("sw_")
        assert row.token_hash != plaintext
        assert plaintext not in row.token_hash
        assert len(row.token_hash) == 64
    engine.dispose()
