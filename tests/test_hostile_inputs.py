"""The server under fire, through the real app and real HTTP on both engines: out-of-range, lax and NUL inputs
are 422s that change nothing; one poisoned run cannot break another run's stream or auto-approval; a 500 keeps
its connection; a revoked token ends its stream."""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import httpx
from sqlalchemy import select, update

from server.app import create_app
from server.db import transaction
from server.models import ApiToken, Decision, Run
from server.settings import Settings
from server.store import decisions
from server.store.feed import add_feed_event
from server.store.runs import get_run
from server.store.tokens import revoke_token
from tests.conftest import LiveServer, make_run, points
from tests.test_live_events import Subscriber

BIG = 2**70


def cursor_of(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def snapshot(client: httpx.Client, run_id: int) -> dict[str, Any]:
    """What is stored about a run, as the API shows it (its heartbeat time aside)."""
    run = client.get(f"/api/v1/runs/{run_id}").json()
    run.pop("last_heartbeat_at")
    export = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "jsonl"}).text
    events = client.get(f"/api/v1/runs/{run_id}/events").json()["data"]
    runs = client.get("/api/v1/runs").json()["data"]
    return {"run": run, "export": export, "events": events, "runs": len(runs)}


# (method, path, keyword arguments of httpx, the field the error must name)
BAD_BODIES: list[tuple[str, str, dict[str, Any], str]] = [
    ("POST", "/rewind", {"json": {"step": 1e20}}, "step"),
    ("POST", "/rewind", {"json": {"step": 2**63}}, "step"),
    ("POST", "/rewind", {"json": {"step": "12"}}, "step"),
    ("POST", "/rewind", {"json": {"step": True}}, "step"),
    ("POST", "/rewind", {"json": {"step": 3.0}}, "step"),
    ("POST", "/rewind", {"json": {"step": 1, "reason": "a\x00b"}}, "reason"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss\x00", "step": 1, "value": 1.0}]}}, "points[0].key"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss", "step": "12", "value": 1.0}]}}, "points[0].step"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss", "step": 3.0, "value": 1.0}]}}, "points[0].step"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss", "step": BIG, "value": 1.0}]}}, "points[0].step"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss", "step": 1, "value": True}]}}, "points[0].value"),
    ("POST", "/metrics", {"json": {"points": [{"key": "loss", "step": 1, "value": "12"}]}}, "points[0].value"),
    # 1e309 overflows to infinity in a JSON parser: refused, not stored as Infinity
    (
        "POST",
        "/metrics",
        {
            "content": b'{"points": [{"key": "loss", "step": 1, "value": 1e309}]}',
            "headers": {"Content-Type": "application/json"},
        },
        "points[0].value",
    ),
    ("PATCH", "", {"json": {"notes": "x\x00"}}, "notes"),
    ("PATCH", "", {"json": {"status": None}}, "status"),
    ("PATCH", "", {"json": {"tags": ["a\x00"]}}, "tags[0]"),
    ("PATCH", "", {"json": {"auto_approve_after_s": 1e12}}, "auto_approve_after_s"),
    ("PATCH", "", {"json": {"reject_backoff": {"steps": BIG}}}, "reject_backoff.steps"),
    ("PATCH", "", {"json": {"reject_backoff": {"epochs": 1e300}}}, "reject_backoff.epochs"),
    ("POST", "/hold", {"json": {"steps": BIG}}, "steps"),
    ("POST", "/commands", {"json": {"action": "set_lr", "lr": 1e300}}, "lr"),
    ("POST", "/commands", {"json": {"action": "stop", "reason": "\x00"}}, "reason"),
    ("POST", "/decisions/1/reject", {"json": {"backoff": {"steps": BIG}}}, "backoff.steps"),
]

BAD_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"auto_approve_after_s": 1e12}, "auto_approve_after_s"),
    ({"reject_backoff": {"steps": BIG}}, "reject_backoff.steps"),
    ({"name": "a\x00b"}, "name"),
    ({"project": "\x00"}, "project"),
    ({"tags": ["ok", "a\x00"]}, "tags[1]"),
    ({"client_key": "k\x00"}, "client_key"),
    ({"config": {"width": BIG}}, "config"),
    ({"config": {"note": "a\x00b"}}, "config"),
    ({"config": {"a\x00": 1}}, "config"),
]

BAD_QUERIES: list[tuple[str, dict[str, Any], str]] = [
    (f"/api/v1/runs/{2**63}", {}, "run_id"),
    (f"/api/v1/runs/{2**31}", {}, "run_id"),
    ("/api/v1/runs/0", {}, "run_id"),
    ("/api/v1/runs/{run}/events/" + str(2**63), {}, "event_id"),
    ("/api/v1/runs", {"cursor": cursor_of({"id": True})}, "cursor"),
    ("/api/v1/runs", {"cursor": cursor_of({"id": BIG})}, "cursor"),
    ("/api/v1/runs", {"cursor": cursor_of({"id": 2**31})}, "cursor"),
    ("/api/v1/runs", {"name": "a\x00"}, "name"),
    ("/api/v1/runs", {"tag": "\x00"}, "tag"),
    ("/api/v1/runs", {"project": "\x00"}, "project"),
    ("/api/v1/runs/{run}/events", {"cursor": cursor_of({"id": True})}, "cursor"),
    ("/api/v1/runs/{run}/events", {"kind": "\x00"}, "kind"),
    ("/api/v1/runs/{run}/metrics", {"key": "\x00"}, "key[0]"),
    ("/api/v1/runs/{run}/metrics", {"min_step": 2**63}, "min_step"),
    ("/api/v1/runs/{run}/metrics/export", {"key": "loss\x00"}, "key[0]"),
    ("/api/v1/runs/{run}/rewinds", {"after": 2**63}, "after"),
    ("/api/v1/runs/{run}/commands", {"after": 2**63}, "after"),
    ("/api/v1/runs/{run}/detection", {"through_step": 2**63}, "through_step"),
    ("/api/v1/runs/{run}/stream", {"after": 2**63}, "after"),
    ("/api/v1/stream", {"after": BIG}, "after"),
]


def test_out_of_range_lax_and_nul_inputs_are_422s_that_change_nothing(client: httpx.Client) -> None:
    run_id = make_run(client, name="kept", tags=["a"], config={"width": 32})
    assert client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(5))}).status_code == 200
    before = snapshot(client, run_id)

    for method, suffix, kwargs, field in BAD_BODIES:
        response = client.request(method, f"/api/v1/runs/{run_id}{suffix}", **kwargs)
        assert response.status_code == 422, (method, suffix, kwargs, response.text)
        assert response.json()["detail"].startswith(f"{field}:"), (kwargs, response.json())
    for fields, field in BAD_CREATES:
        response = client.post("/api/v1/runs", json={"name": "bad", **fields})
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["detail"].startswith(f"{field}"), (fields, response.json())
    for path, params, field in BAD_QUERIES:
        response = client.get(path.format(run=run_id), params=params, headers={"Accept": "text/event-stream"})
        assert response.status_code == 422, (path, params, response.text)
        assert response.json()["detail"].startswith(f"{field}:"), (path, params, response.json())
    huge_id = client.get(f"/api/v1/runs/{run_id}/stream", headers={"Last-Event-ID": str(BIG)})
    assert huge_id.status_code == 422 and huge_id.json()["detail"].startswith("Last-Event-ID:")

    assert snapshot(client, run_id) == before  # nothing stored was lost or changed, nothing was added


def test_a_poisoned_event_cannot_break_any_stream(migrated_url: str) -> None:
    """An event that cannot be encoded (stored by an older server, before inputs were bounded) is sent as an
    ``error`` event with its id; the streams, and reconnects from before it, go on past it."""
    app = create_app(Settings(database_url=migrated_url, auth=False))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        poisoned, healthy = make_run(client, name="poisoned"), make_run(client, name="healthy")
        everything = Subscriber(f"{live.url}/api/v1/stream")
        own = Subscriber(f"{live.url}/api/v1/runs/{poisoned}/stream")
        try:
            hello = everything.next()
            assert own.next().kind == "hello"
            with transaction(app.state.stagewatch.sessions, write=True) as session:
                add_feed_event(session, poisoned, "run", {"change": "legacy", "step": BIG})
            for run_id in (healthy, poisoned):
                assert client.patch(f"/api/v1/runs/{run_id}", json={"notes": "after"}).status_code == 200

            seen = [everything.next() for _ in range(3)]
            assert [(e.kind, e.data["run_id"]) for e in seen] == [
                ("error", poisoned),
                ("run", healthy),
                ("run", poisoned),
            ]
            mine = [own.next() for _ in range(2)]
            assert [e.kind for e in mine] == ["error", "run"]
            assert mine[0].data == {"run_id": poisoned, "detail": "this event could not be encoded"}
        finally:
            everything.close()
            own.close()

        resumed = Subscriber(f"{live.url}/api/v1/stream", {"Last-Event-ID": str(hello.id)})
        try:
            assert resumed.next().kind == "hello"
            assert [resumed.next().kind for _ in range(3)] == ["error", "run", "run"]
        finally:
            resumed.close()


def test_a_run_that_fails_its_auto_approval_does_not_hold_up_the_others(migrated_url: str) -> None:
    app = create_app(Settings(database_url=migrated_url, auth=False))
    sessions = app.state.stagewatch.sessions
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        # The poisoned run has the lower id: a sweep that stopped at the first failure never reached the other.
        run_ids = [make_run(client, name=n, mode="approve", auto_approve_after_s=0.01) for n in ("poisoned", "ok")]
        with transaction(sessions, write=True) as session:
            made = [
                decisions.create(
                    session,
                    get_run(session, run_id),
                    action="decay",
                    factor=0.1,
                    lr=None,
                    step=10,
                    source="operator",
                    actor="test",
                    evidence={},
                    status="proposed",
                )
                for run_id in run_ids
            ]
            proposal_ids = [d.id for d in made]
            # A history that is not a list: approving it raises inside the sweep.
            session.execute(update(Decision).where(Decision.id == proposal_ids[0]).values(history=5))

        approved = client.get(f"/api/v1/runs/{run_ids[1]}/decisions")
        deadline = time.monotonic() + 60  # the sweep runs every 0.5 s: wait for it, and fail if it never comes
        while approved.json()[0]["status"] == "proposed" and time.monotonic() < deadline:
            approved = client.get(f"/api/v1/runs/{run_ids[1]}/decisions")
        assert approved.json()[0]["status"] == "approved"
        assert approved.json()[0]["history"][-1]["actor"] == "auto-approve"
        assert client.get("/healthz").status_code == 200
    with transaction(sessions) as session:
        assert session.get(Decision, proposal_ids[0]).status == "proposed"  # type: ignore[union-attr]
        assert session.get(Run, run_ids[0]).status == "running"  # type: ignore[union-attr]


def _raw_request(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open socket; the status and the body (Content-Length framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(lines[0].split()[1]), body


def test_a_500_keeps_the_connection(migrated_url: str) -> None:
    app = create_app(Settings(database_url=migrated_url, auth=False))

    def broken() -> None:  # a bug in a route, as real as it gets: the whole middleware stack around it
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with LiveServer(app) as live, socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        for _ in range(3):
            status, body = _raw_request(sock, "/broken")
            assert status == 500
            assert json.loads(body) == {"detail": "internal error; see the server log", "code": "internal"}
            status, body = _raw_request(sock, "/healthz")  # the same connection
            assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_revoked_token_ends_its_stream(secured: tuple[str, dict[str, str]], migrated_url: str) -> None:
    url, tokens = secured
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['worker']}"}) as worker:
        run_id = make_run(worker)
        streams = [
            Subscriber(f"{url}/api/v1/runs/{run_id}/stream?token={tokens['viewer']}"),
            Subscriber(f"{url}/api/v1/stream", {"Authorization": f"Bearer {tokens['viewer']}"}),
        ]
        try:
            for stream in streams:
                assert stream.next().kind == "hello"
            app_sessions = create_app(Settings(database_url=migrated_url), check=False).state.stagewatch
            try:
                with transaction(app_sessions.sessions, write=True) as session:
                    token_id = session.scalars(select(ApiToken.id).where(ApiToken.name == "viewer-token")).one()
                    assert revoke_token(session, token_id)
            finally:
                app_sessions.engine.dispose()
            # The streams notice at their next read: a commit wakes them, and they look at least every 2 s.
            assert worker.patch(f"/api/v1/runs/{run_id}", json={"notes": "after"}).status_code == 200
            for stream in streams:
                assert stream.next(timeout=30).kind == "revoked"
                stream.wait_closed(timeout=30)  # the server ended the response
        finally:
            for stream in streams:
                stream.close()
        again = httpx.get(f"{url}/api/v1/stream", params={"token": tokens["viewer"]})
        assert again.status_code == 401
