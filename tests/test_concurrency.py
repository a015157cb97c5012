"""Several workers ingesting into one run at once: no lost point, no double count, no 5xx."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import LiveServer, make_run


def test_concurrent_ingest_and_resends(server: LiveServer, client: httpx.Client) -> None:
    run_id = make_run(client)

    def worker(w: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for b in range(8):
                steps = range(b * 500, (b + 1) * 500)
                batch = [{"key": f"w{w}", "step": s, "value": float(s)} for s in steps]
                # Every worker also sends the same shared points: all but one insert must see duplicates.
                batch += [{"key": "shared", "step": s, "value": -float(s)} for s in steps]
                response = http.post(f"/api/v1/runs/{run_id}/metrics", json={"points": batch})
                statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, range(4)))
    assert all(code == 200 for statuses in results for code in statuses), results
    latest = client.get(f"/api/v1/runs/{run_id}").json()["latest"]
    assert {key: value["count"] for key, value in latest.items()} == {
        "shared": 4000,
        "w0": 4000,
        "w1": 4000,
        "w2": 4000,
        "w3": 4000,
    }
    exported = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"key": "shared"}).text.splitlines()
    assert len(exported) == 1 + 4000
