"""Live events over Server-Sent Events through the real server: order, content, and resuming after a drop."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from server.db import make_engine, make_session_factory, transaction
from server.schemas import RunCreate
from server.store import feed
from server.store.runs import create_run
from tests.conftest import LiveServer, make_run, points

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]


def parse(lines: Iterator[str]) -> Iterator[Event]:
    """The SSE wire format: ``field: value`` lines, an empty line ends an event, ``:`` starts a comment."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield Event(int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


class Subscriber:
    """Reads a stream in a thread; ``next()`` returns its events one by one."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[Event | BaseException] = queue.Queue()
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self._url, self._headers = url, headers or {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self._url, headers=self._headers) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                for event in parse(response.iter_lines()):
                    self.events.put(event)
        except httpx.HTTPError as exc:  # closed by close(): the queue has what was read
            self.events.put(exc)
        except BaseException as exc:
            self.events.put(exc)

    def next(self, timeout: float = 5.0) -> Event:
        item = self.events.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def until(self, kind: str, timeout: float = 5.0) -> list[Event]:
        """Events up to and including the next one of ``kind``."""
        got = [self.next(timeout)]
        while got[-1].kind != kind:
            got.append(self.next(timeout))
        return got

    def wait_closed(self, timeout: float) -> None:
        """Until the server has ended the response (or fail)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream is still open"

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def subscribe(server: LiveServer) -> Iterator[Any]:
    opened: list[Subscriber] = []

    def open_stream(path: str, headers: dict[str, str] | None = None) -> Subscriber:
        subscriber = Subscriber(f"{server.url}{path}", headers)
        opened.append(subscriber)
        return subscriber

    yield open_stream
    for subscriber in opened:
        subscriber.close()


def ingest(client: httpx.Client, run_id: int, body: list[dict[str, object]]) -> None:
    response = client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": body})
    assert response.status_code == 200, response.text


def test_points_and_decisions_arrive_in_order(client: httpx.Client, subscribe: Any):
    run_id = make_run(client)
    stream = subscribe(f"/api/v1/runs/{run_id}/stream")
    hello = stream.next()
    assert hello.kind == "hello" and hello.data == {"cursor": hello.id, "run_id": run_id}

    losses = points("loss", range(1, 4), 0.25)
    ingest(client, run_id, [*losses, {"key": "lr", "step": 3, "value": "NaN", "epoch": 0.5}])
    (event,) = stream.until("points")
    assert event.id > hello.id and event.data["run_id"] == run_id
    keys = event.data["keys"]
    # Each point is [step, value, epoch, wall time]; the time is the ingest's when the worker sent none.
    assert all(isinstance(p[3], float) and p[3] > 1.7e9 for batch in keys.values() for p in batch["points"])
    for batch in keys.values():
        batch["points"] = [p[:3] for p in batch["points"]]
    assert keys == {
        "loss": {
            "count": 3,
            "first_step": 1,
            "last_step": 3,
            "points": [[p["step"], p["value"], None] for p in losses],
        },
        "lr": {"count": 1, "first_step": 3, "last_step": 3, "points": [[3, "NaN", 0.5]]},
    }
    # A large batch carries its ranges only: the dashboard fetches the points it draws.
    ingest(client, run_id, points("loss", range(4, 1004)))
    (big,) = stream.until("points")
    assert big.data["keys"] == {"loss": {"count": 1000, "first_step": 4, "last_step": 1003}}
    # A resent batch stores nothing and announces nothing; the next event is the command.
    ingest(client, run_id, points("loss", range(1, 4), 0.25))
    assert client.post(f"/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.5}).status_code == 201
    (decision,) = stream.until("decision")
    assert (decision.data["status"], decision.data["action"], decision.data["factor"]) == ("approved", "decay", 0.5)


def test_a_reconnecting_subscriber_misses_nothing(client: httpx.Client, subscribe: Any):
    run_id = make_run(client)
    first = subscribe(f"/api/v1/runs/{run_id}/stream")
    first.next()  # hello
    ingest(client, run_id, points("loss", range(1, 3)))
    (seen,) = first.until("points")
    first.close()

    # While nobody listens: two batches, a command, its delivery, a stage.
    ingest(client, run_id, points("loss", range(3, 5)))
    assert client.post(f"/api/v1/runs/{run_id}/commands", json={"action": "stop"}).status_code == 201
    assert client.get(f"/api/v1/runs/{run_id}/commands").json()["data"][0]["status"] == "delivered"
    ingest(client, run_id, [{"key": "lr", "step": 5, "value": 0.1}])

    # EventSource sends the last id it saw as Last-Event-ID; the stream goes on right after it.
    again = subscribe(f"/api/v1/runs/{run_id}/stream", {"Last-Event-ID": str(seen.id)})
    assert again.next().data["cursor"] == seen.id
    missed = [again.next() for _ in range(4)]
    assert [e.kind for e in missed[:3]] == ["points", "decision", "decision"]
    assert [e.data["status"] for e in missed[1:3]] == ["approved", "delivered"]
    assert missed[3].kind in ("points", "stage")
    ids = [e.id for e in missed]
    assert ids == sorted(ids) and ids[0] > seen.id and len(set(ids)) == len(ids)
    assert missed[0].data["keys"]["loss"]["first_step"] == 3

    # `after` does the same for clients that cannot set the header; it replays the very same events.
    replay = subscribe(f"/api/v1/runs/{run_id}/stream?after={seen.id}")
    replay.next()
    assert [replay.next() for _ in range(4)] == missed


def test_the_all_runs_stream_and_stages(client: httpx.Client, subscribe: Any):
    stream = subscribe("/api/v1/stream")
    stream.next()
    one, two = make_run(client), make_run(client)
    created = stream.until("run") + stream.until("run")
    assert [(e.data["run_id"], e.data["change"]) for e in created if e.kind == "run"] == [
        (one, "created"),
        (two, "created"),
    ]
    ingest(client, two, [{"key": "lr", "step": s, "value": 0.1 if s < 3 else 0.01} for s in range(1, 5)])
    events = stream.until("points")
    stages: list[Event] = []
    while len(stages) < 2:  # one event per stage a pass changed, in index order: 0 (closed), 1 (opened)
        event = stream.next()
        if event.kind == "stage":
            stages.append(event)
    assert events[-1].data["run_id"] == two
    assert [(s.data["index"], s.data["start_step"], s.data["end_step"], s.data["lr"]) for s in stages] == [
        (0, 1, 2, 0.1),
        (1, 3, None, 0.01),
    ]
    # From the beginning: everything, in order.
    everything = subscribe("/api/v1/stream?after=0")
    assert everything.next().data["cursor"] == 0
    assert [everything.next().kind for _ in range(2)] == ["run", "run"]


def test_bad_cursor_and_unknown_run(client: httpx.Client):
    run_id = make_run(client)
    bad = client.get(f"/api/v1/runs/{run_id}/stream", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]
    negative = client.get(f"/api/v1/runs/{run_id}/stream", params={"after": -1})
    assert negative.status_code == 422 and "after" in negative.json()["detail"]
    missing = client.get("/api/v1/runs/999/stream")
    assert missing.status_code == 404


@pytest.mark.parametrize("migrated_url", ["postgres"], indirect=True)
def test_an_event_committed_after_a_later_one_is_not_skipped(migrated_url: str) -> None:
    """PostgreSQL hands out feed ids when rows are inserted, and transactions commit in any order. A stream's
    cursor must not move past event N while N's transaction is in flight, or N, committed after N+1 was read,
    would never reach it. (Read through the stream's own cursor, on a real database: which of two commits a
    live stream reads first is a race an HTTP test could not pin down.)"""
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)
    try:
        with transaction(sessions, write=True) as session:
            run_id = create_run(session, RunCreate(name="feed"), actor="test").id
        with transaction(sessions) as session:
            cursor = feed.FeedCursor(feed.last_feed_id(session))
        with psycopg.connect(make_url(migrated_url).set(drivername="postgresql").render_as_string(False)) as held:
            row = held.execute(
                "INSERT INTO feed_events (run_id, kind, payload, created_at) VALUES (%s, 'run', '{}', now()) "
                "RETURNING id",
                (run_id,),
            ).fetchone()
            assert row is not None
            with transaction(sessions, write=True) as session:  # a later id, committed first
                feed.add_feed_event(session, run_id, "points", {"keys": {}})
            with transaction(sessions) as session:
                assert cursor.read(session, run_id=None, limit=100) == []  # held back behind the in-flight id
                assert cursor.read(session, run_id=run_id, limit=100) == []
            held.commit()
        with transaction(sessions) as session:
            events = cursor.read(session, run_id=None, limit=100)
            assert [(e.id, e.kind) for e in events] == [(row[0], "run"), (row[0] + 1, "points")]
    finally:
        engine.dispose()


@pytest.mark.parametrize("migrated_url", ["postgres"], indirect=True)
def test_an_id_that_never_commits_is_passed_over_once_nothing_can_hold_it(
    migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolled-back transaction (or one of a killed server) leaves a hole in the sequence for good. The stream
    passes over it once no transaction that could hold it runs; while an unrelated long transaction keeps the
    database's oldest running transaction back, only after GAP_GRACE_S."""
    engine = make_engine(migrated_url)
    sessions = make_session_factory(engine)
    libpq = make_url(migrated_url).set(drivername="postgresql").render_as_string(False)
    monkeypatch.setattr(feed, "GAP_SETTLE_S", 0.0)
    monkeypatch.setattr(feed, "GAP_GRACE_S", 600.0)
    try:
        with transaction(sessions, write=True) as session:
            run_id = create_run(session, RunCreate(name="feed"), actor="test").id
        with transaction(sessions) as session:
            cursor = feed.FeedCursor(feed.last_feed_id(session))
        with psycopg.connect(libpq) as long_one, psycopg.connect(libpq) as rolled_back:
            long_one.execute("SELECT pg_current_xact_id()")  # a transaction with an id, running throughout
            rolled_back.execute(
                "INSERT INTO feed_events (run_id, kind, payload, created_at) VALUES (%s, 'run', '{}', now())",
                (run_id,),
            )
            rolled_back.rollback()
            with transaction(sessions, write=True) as session:
                feed.add_feed_event(session, run_id, "points", {"keys": {}})
            with transaction(sessions) as session:  # the long transaction might hold the hole: waited for
                assert cursor.read(session, run_id=None, limit=100) == []
            monkeypatch.setattr(feed, "GAP_GRACE_S", 0.0)
            with transaction(sessions) as session:  # ... until the grace is over
                assert [e.kind for e in cursor.read(session, run_id=None, limit=100)] == ["points"]
            monkeypatch.setattr(feed, "GAP_GRACE_S", 600.0)
            long_one.rollback()
            rolled_back.execute(
                "INSERT INTO feed_events (run_id, kind, payload, created_at) VALUES (%s, 'run', '{}', now())",
                (run_id,),
            )
            rolled_back.rollback()
        with transaction(sessions, write=True) as session:
            feed.add_feed_event(session, run_id, "stage", {})
        # Nothing of this test can hold the hole any more: it is passed over as soon as no transaction anywhere in
        # the cluster is older than it (an autovacuum's ANALYZE or another client may be for a moment).
        deadline = time.monotonic() + 60
        kinds: list[str] = []
        while not kinds and time.monotonic() < deadline:
            with transaction(sessions) as session:
                kinds = [e.kind for e in cursor.read(session, run_id=None, limit=100)]
        assert kinds == ["stage"]
    finally:
        engine.dispose()
