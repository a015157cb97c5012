"""Bad input: a clear JSON error naming what was wrong, never a 500, and nothing stored changes."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, make_run, points


def stored(client: httpx.Client, run_id: int) -> list[tuple[str, int]]:
    return [(s["key"], s["total_points"]) for s in client.get(f"/api/v1/runs/{run_id}/metrics").json()["series"]]


@pytest.mark.parametrize(
    ("body", "detail_start"),
    [
        (b"", "body: expected a JSON object"),
        (b"{not json", "body: Invalid JSON"),
        (b'{"points": "x"}', "points:"),
        (b"[]", "body:"),
        (b'{"points": [{"key": "loss", "step": 1}]}', "points[0].value: Field required"),
        (b'{"points": [{"key": "", "step": 1, "value": 1}]}', "points[0].key"),
        (b'{"points": [{"key": "loss", "step": 1.5, "value": 1}]}', "points[0].step"),
        (b'{"points": [{"key": "loss", "step": 1, "value": "high"}]}', "points[0].value"),
        (b'{"points": [{"key": "loss", "step": 1, "value": 1, "vaule": 2}]}', "points[0].vaule"),
        (b'{"points": [{"key": "loss", "step": 1, "value": 1, "time": "NaN"}]}', "points[0].time"),
        (b'{"points": [{"key": "loss", "step": 1, "value": 1, "epoch": -1}]}', "points[0].epoch"),
        (b'{"points": [{"key": "loss", "step": 99999999999999999999, "value": 1}]}', "points[0].step"),
    ],
)
def test_malformed_batches_are_422_and_change_nothing(client: httpx.Client, body: bytes, detail_start: str) -> None:
    run_id = make_run(client)
    client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(5))})
    response = client.post(f"/api/v1/runs/{run_id}/metrics", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid"
    assert response.json()["detail"].startswith(detail_start)
    assert stored(client, run_id) == [("loss", 5)]


def test_ingest_into_unknown_run_is_404(client: httpx.Client) -> None:
    response = client.post("/api/v1/runs/4242/metrics", json={"points": points("loss", range(2))})
    assert response.status_code == 404
    assert response.json()["detail"] == "run 4242 does not exist"


def test_oversize_payloads_are_413(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, auth=False, max_body_bytes=20_000, max_points_per_batch=50)
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url) as client:
        run_id = make_run(client)
        big = client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(1000))})
        assert big.status_code == 413
        assert "over the limit of 20000 bytes" in big.json()["detail"]

        def chunks() -> object:
            for _ in range(30):
                yield b" " * 1000

        # Typed as JSON: an untyped body is refused (415) before its size is known (server.web_security).
        json_type = {"Content-Type": "application/json"}
        streamed = client.post(f"/api/v1/runs/{run_id}/metrics", content=chunks(), headers=json_type)  # type: ignore[arg-type]
        assert streamed.status_code == 413
        many = client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(51))})
        assert many.status_code == 413
        assert many.json()["detail"].startswith("points: 51 points in one batch, the limit is 50")
        assert stored(client, run_id) == []


def test_unknown_paths_and_methods_are_json(client: httpx.Client) -> None:
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no such path: /api/v1/nothing-here"
    wrong = client.delete("/api/v1/runs")
    assert wrong.status_code == 405
    assert "DELETE" in wrong.json()["detail"]
    bad_id = client.get("/api/v1/runs/abc")
    assert bad_id.status_code == 422
    assert bad_id.json()["detail"].startswith("run_id")


def test_openapi_documents_the_contract(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in [
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/metrics",
        "/api/v1/runs/{run_id}/decisions",
        "/api/v1/runs/{run_id}/stages",
        "/healthz",
    ]:
        assert path in paths, path
    body = paths["/api/v1/runs/{run_id}/metrics"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    point = body["properties"]["points"]["items"]
    assert set(point["required"]) == {"key", "step", "value"}
    assert {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]} in point["properties"]["value"]["anyOf"]
