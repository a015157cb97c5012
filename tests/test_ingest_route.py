"""The ingest's own route (server.ingest_route) answers exactly as the documented FastAPI route did."""

from __future__ import annotations

import httpx
import pytest
from starlette.routing import Match

from server.ingest_route import IngestRoute
from tests.conftest import make_run, points


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "root_path": ""}


@pytest.mark.parametrize(
    ("method", "path", "taken"),
    [
        ("POST", "/api/v1/runs/7/metrics", True),
        ("POST", "/api/v1/runs/2147483647/metrics", True),
        ("POST", "/api/v1/runs/0/metrics", False),  # out of range: FastAPI's 422 naming run_id
        ("POST", "/api/v1/runs/2147483648/metrics", False),
        ("POST", "/api/v1/runs/-1/metrics", False),
        ("POST", "/api/v1/runs/x/metrics", False),
        ("GET", "/api/v1/runs/7/metrics", False),  # the series query
        ("POST", "/api/v1/runs/7/metrics/export", False),
    ],
)
def test_it_takes_only_what_it_answers_identically(method: str, path: str, taken: bool) -> None:
    match, _ = IngestRoute().matches(_scope(method, path))
    assert (match is Match.FULL) is taken


def test_answers_and_errors_through_the_app(client: httpx.Client) -> None:
    run_id = make_run(client)
    url = f"/api/v1/runs/{run_id}/metrics"
    stored = client.post(url, json={"points": points("loss", range(3))})
    assert stored.status_code == 200
    assert stored.json() | {"commands": []} == {"accepted": 3, "inserted": 3, "duplicates": 0, "commands": []}
    assert stored.headers["x-content-type-options"] == "nosniff"  # the security headers wrap it too
    again = client.post(url, json={"points": points("loss", range(3))})
    assert again.json()["duplicates"] == 3
    clash = client.post(url, json={"points": points("loss", range(1), value=9.0)})
    assert clash.status_code == 409 and clash.json()["code"] == "conflict"
    bad = client.post(url, json={"points": [{"key": "loss", "step": -1, "value": 1}]})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("points[0].step")
    zero = client.post("/api/v1/runs/0/metrics", json={"points": points("loss", range(1))})
    assert zero.status_code == 422 and "run_id" in zero.json()["detail"]
    missing = client.post("/api/v1/runs/4242/metrics", json={"points": points("loss", range(1))})
    assert missing.status_code == 404 and missing.json()["detail"] == "run 4242 does not exist"


def test_the_documented_route_is_the_same_path(client: httpx.Client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/api/v1/runs/{run_id}/metrics"]["post"]
    assert operation["operationId"].startswith("ingest_metrics")
    assert "points" in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]


def test_auth_is_checked_first(secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    auth = {role: {"Authorization": f"Bearer {token}"} for role, token in tokens.items()}
    with httpx.Client(base_url=url) as client:
        run_id = client.post("/api/v1/runs", json={"name": "r"}, headers=auth["worker"]).json()["id"]
        body = {"points": points("loss", range(1))}
        assert client.post(f"/api/v1/runs/{run_id}/metrics", json=body).status_code == 401
        viewer = client.post(f"/api/v1/runs/{run_id}/metrics", json=body, headers=auth["viewer"])
        assert viewer.status_code == 403
        basic = client.post(f"/api/v1/runs/{run_id}/metrics", json=body, headers={"Authorization": "Basic abc"})
        assert basic.status_code == 401
        assert client.post(f"/api/v1/runs/{run_id}/metrics", json=body, headers=auth["worker"]).status_code == 200
