"""Many workers at once: N simulated workers, each posting one batch of P points per second over its own
keep-alive connection for D seconds, against the real server with authentication on; and the per-request floor.

For each engine: ``stagewatch db upgrade``, a worker token (``stagewatch token create``), ``stagewatch serve`` (auth
on) on a fresh database in its own process, N runs created with the token. Then:

* **floor**: a bare FastAPI app (one endpoint: validate a one-point JSON body, one SQLite INSERT and COMMIT, WAL,
  ``synchronous=NORMAL``), served by uvicorn the same way as ``stagewatch serve``, in its own process; the same
  client sends one-point requests to it and one-point ingests (token auth) to Stagewatch, interleaved in rounds so
  that both see the same machine. Reported: median latency of each and their ratio; the target (<= 2x) is
  SQLite's, the engine the floor is built on (a PostgreSQL commit's round trips and WAL flush are not in it).
* **load**: N asyncio workers in this process (``httpx.AsyncClient``, one connection each), worker ``i`` sending
  batch ``k`` (P points: ``--keys`` keys at P/keys consecutive steps, steps increasing) at ``phase_i + k`` seconds,
  phases drawn at random in [0, 1) s; a late response delays that worker's next batch (never a burst to catch
  up). Per request: latency and how late it started. Server CPU (Linux ``/proc``), the generator's own CPU,
  the machine's load average and CPU split (``nice`` is other people's niced work) sampled every second.
* **check**: every run exported (CSV) and its lines counted: points stored must equal points acknowledged.
* **reference under load**: the same workers against the bare app (row ``floor``), in the same run: the machine's
  other load changes from minute to minute, and this row says what a minimal FastAPI + SQLite server got meanwhile.

The generator shares the machine's cores with the server (request bodies are encoded before the clock starts, and
are the same bytes for every worker); on a 2-core machine that is part of what is measured. Only 127.0.0.1 is
contacted; sizes are bounded (``--workers`` <= 1000, ``--points`` <= 100,000, ``--seconds`` <= 3600).

    .venv/bin/python -m benchmarks.bench_load [--workers 100] [--points 100] [--seconds 60]
        [--engines sqlite,postgres] [--out NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks import harness

KEYS = ("loss", "lr", "grad_norm", "accuracy")
TARGET_P99_S = 0.250
TARGET_FLOOR_RATIO = 2.0
MAX_WORKERS = 1000
MAX_POINTS = 100_000
MAX_SECONDS = 3600
REQUEST_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 120.0  # after the last scheduled batch, how long stragglers may take before they are cancelled
HOST = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--workers", type=harness.bounded_int(MAX_WORKERS), default=100, help="simulated workers (default 100)"
    )
    parser.add_argument(
        "--points",
        type=harness.bounded_int(MAX_POINTS),
        default=100,
        help="points per batch, one batch per second (default 100)",
    )
    parser.add_argument(
        "--seconds", type=harness.bounded_int(MAX_SECONDS), default=60, help="batches per worker (default 60)"
    )
    parser.add_argument(
        "--keys", type=int, choices=range(1, len(KEYS) + 1), default=len(KEYS), help="metric keys per step (4)"
    )
    parser.add_argument(
        "--floor-requests", type=harness.bounded_int(10_000), default=600, help="one-point requests to each side (600)"
    )
    parser.add_argument("--skip-floor", action="store_true", help="only the load")
    parser.add_argument("--out", default="default", help="results go to benchmarks/results/load-NAME.json")
    # Internal: the bare FastAPI + SQLite app, run in its own process by this same script.
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "DB"), help=argparse.SUPPRESS)
    return parser


@dataclass
class Server:
    base_url: str
    token: str
    process: subprocess.Popen[bytes]


# --- the floor: a bare FastAPI + SQLite app ---------------------------------------------------------------------


class FloorPoint(BaseModel):
    key: str
    step: int
    value: float
    time: float | None = None


class FloorBatch(BaseModel):
    points: list[FloorPoint]


def serve_floor(port: int, db_path: str) -> None:
    """One endpoint that validates a batch like Stagewatch's and stores it with one INSERT and COMMIT, on a
    per-thread SQLite connection tuned as Stagewatch's (WAL, synchronous=NORMAL); served like ``stagewatch serve``."""
    import uvicorn

    setup = sqlite3.connect(db_path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS points (key TEXT, step INTEGER, value REAL, time REAL)")
    setup.commit()
    setup.close()
    local = threading.local()

    def connection() -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
        return conn

    app = FastAPI()

    @app.post("/points")
    def insert(batch: FloorBatch) -> dict[str, int]:
        conn = connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO points VALUES (?, ?, ?, ?)", [(p.key, p.step, p.value, p.time) for p in batch.points]
        )
        conn.execute("COMMIT")
        return {"inserted": len(batch.points)}

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


@contextlib.contextmanager
def floor_server() -> Iterator[tuple[Server, Path]]:
    """The bare app in its own process, and its database file."""
    with tempfile.TemporaryDirectory(prefix="stagewatch-floor-") as tmp:
        port = harness.free_port()
        base_url = f"http://{HOST}:{port}"
        log_path = Path(tmp) / "floor.log"
        db_path = Path(tmp) / "f.db"
        command = [sys.executable, "-m", "benchmarks.bench_load", "--serve-floor", str(port), str(db_path)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=harness.REPO_ROOT)
            try:
                harness.wait_healthy(process, base_url, log_path)
                yield Server(base_url, "", process), db_path
            finally:
                harness.stop_server(process)


# --- Stagewatch with auth on ------------------------------------------------------------------------------------


@contextlib.contextmanager
def authed_server(db_url: str) -> Iterator[Server]:
    """``harness.running_server`` with authentication on: a worker token made with the CLI, as an admin would."""
    harness.migrate(db_url)
    token = harness.create_token(db_url, "worker", "bench-load")
    port = harness.free_port()
    base_url = f"http://{HOST}:{port}"
    command = [str(harness.stagewatch_script()), "serve", "--db", db_url, "--host", HOST, "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-log-") as logdir:
        log_path = Path(logdir) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=harness.server_env(None))
            try:
                harness.wait_healthy(process, base_url, log_path)
                yield Server(base_url, token, process)
            finally:
                harness.stop_server(process)


def batch_bodies(keys: Sequence[str], points: int, seconds: int, seed: int) -> tuple[list[bytes], int]:
    """Batch ``k`` of every worker: ``points // len(keys)`` consecutive steps from ``k * that``, all keys."""
    steps = max(1, points // len(keys))
    rng = random.Random(seed)
    bodies = [harness.encode(harness.training_batch(rng, keys, k * steps, steps)) for k in range(seconds)]
    return bodies, steps * len(keys)


# --- the floor comparison ---------------------------------------------------------------------------------------


def measure_floor(server: Server, floor_url: str, run_id: int, requests: int) -> dict[str, Any]:
    """Interleaved rounds of one-point requests: the bare app, then Stagewatch's ingest, on one client each (same
    code, same thread), so that both see the same machine load."""
    rounds, per_round = 10, max(1, requests // 10)
    floor_body = harness.encode([{"key": "loss", "step": 0, "value": 0.5, "time": harness.BASE_TIME}])
    step = 10_000_000  # far above the load's steps: this run gets no load batches anyway
    ingest_bodies = [
        harness.encode([{"key": "loss", "step": step + i, "value": 0.5, "time": harness.BASE_TIME}])
        for i in range(rounds * per_round + 50)
    ]
    headers = {"content-type": "application/json"}
    auth = {"Authorization": f"Bearer {server.token}", **headers}
    floor_times: list[float] = []
    ours: list[float] = []
    with harness.http_client(floor_url) as floor, harness.http_client(server.base_url) as sw:
        bodies = iter(ingest_bodies)
        for _ in range(50):  # warm-up: connections, caches, psycopg's prepared statements
            harness.check_status(floor.post("/points", content=floor_body, headers=headers))
            harness.check_status(sw.post(f"/api/v1/runs/{run_id}/metrics", content=next(bodies), headers=auth))
        for _ in range(rounds):
            for _ in range(per_round):
                started = time.perf_counter()
                response = floor.post("/points", content=floor_body, headers=headers)
                floor_times.append(time.perf_counter() - started)
                harness.check_status(response)
            for _ in range(per_round):
                body = next(bodies)
                started = time.perf_counter()
                response = sw.post(f"/api/v1/runs/{run_id}/metrics", content=body, headers=auth)
                ours.append(time.perf_counter() - started)
                harness.check_status(response)
    floor_p50 = harness.percentile(floor_times, 50)
    ours_p50 = harness.percentile(ours, 50)
    return {
        "requests_each": len(ours),
        "floor_s": {"p50": floor_p50, "p95": harness.percentile(floor_times, 95), "mean": sum(floor_times) / len(ours)},
        "ingest_1pt_s": {"p50": ours_p50, "p95": harness.percentile(ours, 95), "mean": sum(ours) / len(ours)},
        "ratio_p50": ours_p50 / floor_p50,
    }


# --- the load ---------------------------------------------------------------------------------------------------


@dataclass
class WorkerLog:
    sent: int = 0
    sent_at: list[float] = field(default_factory=list)  # seconds since t0, of each answered request
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    acknowledged: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


def worker_client(base_url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"content-type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


async def connect(client: httpx.AsyncClient) -> None:
    """Opens the worker's keep-alive connection before the clock starts (a worker connects once, not per batch)."""
    response = await client.get("/healthz")
    response.raise_for_status()


async def worker(
    client: httpx.AsyncClient, url: str, bodies: Sequence[bytes], t0: float, phase: float, log: WorkerLog
) -> None:
    for k, body in enumerate(bodies):
        due = t0 + phase + k
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.perf_counter()
        log.lateness.append(max(0.0, started - due))
        log.sent += 1
        try:
            response = await client.post(url, content=body)
        except httpx.HTTPError as exc:
            log.errors += 1
            if len(log.error_samples) < 3:
                log.error_samples.append(f"{type(exc).__name__}: {exc}")
            continue
        log.latencies.append(time.perf_counter() - started)
        log.sent_at.append(started - t0)
        if response.status_code != 200:
            log.errors += 1
            if len(log.error_samples) < 3:
                log.error_samples.append(f"HTTP {response.status_code}: {response.text[:200]}")
            continue
        log.acknowledged += response.json()["inserted"]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_ticks() -> list[int]:
    """The machine's CPU time so far, per state (``/proc/stat``: user nice system idle iowait ...)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


class MachineSampler:
    """Load average once a second (in a thread), and the machine's CPU split over the whole interval."""

    def __init__(self) -> None:
        self.load1: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.cpu: dict[str, float] = {}
        self._ticks: list[int] = []

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.load1.append(os.getloadavg()[0])

    def __enter__(self) -> MachineSampler:
        self._ticks = machine_ticks()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        spent = [b - a for a, b in zip(self._ticks, machine_ticks(), strict=False)]
        total = sum(spent) or 1
        self.cpu = {name: 100 * spent[i] / total for i, name in enumerate(CPU_FIELDS)}

    def summary(self) -> dict[str, Any]:
        load = self.load1 or [os.getloadavg()[0]]
        return {
            "load1_mean": sum(load) / len(load),
            "load1_max": max(load),
            "cpu_percent": self.cpu,  # of all CPUs; "nice" is niced work (other people's benchmarks)
            "cpus": os.cpu_count(),
        }


async def run_load(
    server: Server, paths: Sequence[str], bodies: Sequence[bytes], seed: int
) -> tuple[list[WorkerLog], float]:
    rng = random.Random(seed)
    logs = [WorkerLog() for _ in paths]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(worker_client(server.base_url, server.token)) for _ in paths]
        await asyncio.gather(*(connect(client) for client in clients))
        t0 = time.perf_counter() + 0.5
        tasks = [
            asyncio.create_task(worker(client, path, bodies, t0, rng.random(), log))
            for client, path, log in zip(clients, paths, logs, strict=True)
        ]
        done, pending = await asyncio.wait(tasks, timeout=len(bodies) + 1.0 + DRAIN_GRACE_S)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # a bug in the generator must not pass for a measurement
        if pending:
            raise RuntimeError(
                f"{len(pending)} workers still busy {DRAIN_GRACE_S:.0f} s after their last batch was due"
            )
        return logs, time.perf_counter() - t0


def count_stored(server: Server, run_ids: Sequence[int]) -> dict[int, int]:
    stored = {}
    headers = {"Authorization": f"Bearer {server.token}"}
    with harness.http_client(server.base_url) as client:
        for run_id in run_ids:
            response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"}, headers=headers)
            harness.check_status(response)
            stored[run_id] = max(0, response.text.count("\n") - 1)  # minus the header line
    return stored


def bench_engine(engine: str, args: argparse.Namespace, floor: Server | None) -> dict[str, Any]:
    keys = KEYS[: args.keys]
    bodies, _ = batch_bodies(keys, args.points, args.seconds, args.seed)
    with harness.database(engine, args.postgres_url) as url, authed_server(url) as server:
        headers = {"Authorization": f"Bearer {server.token}"}
        with harness.http_client(server.base_url) as client:
            run_ids = []
            for i in range(args.workers + 1):
                response = client.post("/api/v1/runs", json={"name": f"load-{i}", "project": "bench"}, headers=headers)
                harness.check_status(response, 201)
                run_ids.append(response.json()["id"])
        floor_run, load_runs = run_ids[0], run_ids[1:]
        one_point = None
        if floor is not None:
            print(f"[load] {engine}: floor, {args.floor_requests} one-point requests each side ...", flush=True)
            one_point = measure_floor(server, floor.base_url, floor_run, args.floor_requests)
        paths = [f"/api/v1/runs/{run_id}/metrics" for run_id in load_runs]
        result = measure_load(engine, server, paths, bodies, args)
        stored = count_stored(server, load_runs)
    result.update(engine_version=harness.engine_version(engine, args.postgres_url), keys=list(keys), floor=one_point)
    return check_stored(result, dict(zip(paths, stored.values(), strict=True)))


def bench_floor_load(floor: Server, db_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same load against the bare app, in the same run: what this machine allows a FastAPI + SQLite server
    right now (the other load on it changes from minute to minute). Its workers all post to its one table."""
    keys = KEYS[: args.keys]
    bodies, _ = batch_bodies(keys, args.points, args.seconds, args.seed)
    paths = ["/points"] * args.workers
    before = _count_rows(db_path)  # the one-point requests of the floor comparisons
    result = measure_load("floor", floor, paths, bodies, args)
    stored = _count_rows(db_path) - before
    result.update(engine_version=f"bare FastAPI + SQLite {sqlite3.sqlite_version}", keys=list(keys), floor=None)
    return check_stored(result, {"/points": stored})


def _count_rows(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        ((count,),) = conn.execute("SELECT count(*) FROM points").fetchall()
        return int(count)
    finally:
        conn.close()


def measure_load(
    engine: str, server: Server, paths: Sequence[str], bodies: Sequence[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    print(
        f"[load] {engine}: {len(paths)} workers x {args.points} points/s x {args.seconds} s "
        f"(load average now {os.getloadavg()[0]:.2f}) ...",
        flush=True,
    )
    server_cpu0, own_cpu0 = process_cpu_s(server.process.pid), time.process_time()
    with MachineSampler() as machine:
        logs, wall = asyncio.run(run_load(server, paths, bodies, args.seed))
    server_cpu, own_cpu = process_cpu_s(server.process.pid) - server_cpu0, time.process_time() - own_cpu0
    latencies = [x for log in logs for x in log.latencies]
    lateness = [x for log in logs for x in log.lateness]
    acknowledged: dict[str, int] = {}
    for path, log in zip(paths, logs, strict=True):
        acknowledged[path] = acknowledged.get(path, 0) + log.acknowledged
    errors = sum(log.errors for log in logs)
    # Per second of the run (by send time): requests and their worst latency, to tell a stall of the whole
    # server (every request of a second slow) from a few unlucky ones.
    by_second: dict[int, list[float]] = {}
    for log in logs:
        for at, latency in zip(log.sent_at, log.latencies, strict=True):
            by_second.setdefault(int(at), []).append(latency)
    timeline = [
        {"second": sec, "requests": len(v), "p50_s": harness.percentile(v, 50), "max_s": max(v)}
        for sec, v in sorted(by_second.items())
    ]
    total_ack = sum(acknowledged.values())
    return {
        "engine": engine,
        "workers": len(paths),
        "points_per_batch": len(json.loads(bodies[0])["points"]),
        "seconds": args.seconds,
        "requests": sum(log.sent for log in logs),
        "scheduled_requests": args.workers * args.seconds,
        "errors": errors,
        "error_samples": [s for log in logs for s in log.error_samples][:10],
        "points_acknowledged": total_ack,
        "acknowledged_by_path": acknowledged,
        "wall_s": wall,
        "offered_points_per_s": len(paths) * len(json.loads(bodies[0])["points"]),
        "achieved_points_per_s": total_ack / wall,
        "latency_s": {
            "p50": harness.percentile(latencies, 50),
            "p95": harness.percentile(latencies, 95),
            "p99": harness.percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
        },
        "start_lateness_s": {"p99": harness.percentile(lateness, 99), "max": max(lateness, default=float("nan"))},
        # A worker that never fell a whole batch behind its schedule: the server kept up.
        "sustained": errors == 0 and max(lateness, default=0.0) < 1.0,
        "server_cpu_percent_of_one_core": 100 * server_cpu / wall,
        "generator_cpu_percent_of_one_core": 100 * own_cpu / wall,
        "machine": machine.summary(),
        "timeline": timeline,
    }


def check_stored(result: dict[str, Any], stored: dict[str, int]) -> dict[str, Any]:
    """Points stored (per request path: a run) against points acknowledged to the workers."""
    acknowledged: dict[str, int] = result.pop("acknowledged_by_path")
    mismatched = [path for path in acknowledged if stored.get(path) != acknowledged[path]]
    result.update(
        points_stored=sum(stored.values()),
        stored_equals_acknowledged=not mismatched,
        mismatched=mismatched[:20],
    )
    result["sustained"] = result["sustained"] and not mismatched
    return result


def report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    print(
        "\nThe load generator runs in this process, on the same cores as the server "
        f"({os.cpu_count()} here): its CPU is in the table."
    )
    harness.print_table(
        "Many workers: one batch per worker per second, each on its own keep-alive connection, auth on",
        [
            "engine",
            "workers",
            "pts/batch",
            "s",
            "errors",
            "acked",
            "stored",
            "pts/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "late max s",
            "server %cpu",
            "gen %cpu",
            "load1",
            "nice %",
        ],
        [
            [
                r["engine"],
                r["workers"],
                r["points_per_batch"],
                r["seconds"],
                r["errors"],
                r["points_acknowledged"],
                r["points_stored"],
                r["achieved_points_per_s"],
                r["latency_s"]["p50"] * 1e3,
                r["latency_s"]["p95"] * 1e3,
                r["latency_s"]["p99"] * 1e3,
                r["latency_s"]["max"] * 1e3,
                r["start_lateness_s"]["max"],
                r["server_cpu_percent_of_one_core"],
                r["generator_cpu_percent_of_one_core"],
                r["machine"]["load1_mean"],
                r["machine"]["cpu_percent"].get("nice", float("nan")),
            ]
            for r in results
        ],
    )
    floors = [r for r in results if r["floor"]]
    if floors:
        harness.print_table(
            "One-point request, sequential, one client: bare FastAPI + SQLite vs Stagewatch ingest (token auth)",
            ["engine", "requests", "floor p50 ms", "ingest p50 ms", "floor p95 ms", "ingest p95 ms", "ratio p50"],
            [
                [
                    r["engine"],
                    r["floor"]["requests_each"],
                    r["floor"]["floor_s"]["p50"] * 1e3,
                    r["floor"]["ingest_1pt_s"]["p50"] * 1e3,
                    r["floor"]["floor_s"]["p95"] * 1e3,
                    r["floor"]["ingest_1pt_s"]["p95"] * 1e3,
                    r["floor"]["ratio_p50"],
                ]
                for r in floors
            ],
        )
    targets: dict[str, Any] = {}
    for r in results:
        engine = r["engine"]
        if engine == "floor":
            print(
                f"reference: the bare FastAPI + SQLite app under the same load, same run: p99 "
                f"{r['latency_s']['p99'] * 1e3:,.1f} ms, {r['errors']} errors (what this machine allowed meanwhile)"
            )
            continue
        met = harness.target_line(
            f"{engine} ingest p99", r["latency_s"]["p99"] * 1e3, TARGET_P99_S * 1e3, "ms", higher_is_better=False
        )
        targets[f"{engine}_p99"] = {
            "target_ms": TARGET_P99_S * 1e3,
            "value_ms": r["latency_s"]["p99"] * 1e3,
            "met": met,
        }
        clean = r["errors"] == 0 and r["stored_equals_acknowledged"]
        print(
            f"target {engine} 0 errors, stored == acknowledged: {r['errors']} errors, "
            f"{r['points_stored']:,} stored / {r['points_acknowledged']:,} acknowledged "
            f"-> {'met' if clean else 'MISSED'}"
        )
        targets[f"{engine}_clean"] = {"met": clean, "sustained": r["sustained"]}
        if r["floor"] and engine == "sqlite":
            ratio = r["floor"]["ratio_p50"]
            met = harness.target_line(
                f"{engine} 1-point ingest / floor", ratio, TARGET_FLOOR_RATIO, "x", higher_is_better=False
            )
            targets[f"{engine}_floor_ratio"] = {"target": TARGET_FLOOR_RATIO, "value": ratio, "met": met}
        elif r["floor"]:
            # The floor is an embedded SQLite file: a PostgreSQL commit's round trips and WAL flush are not in it,
            # so this ratio is printed (in the table above) but is no target.
            print(f"reported {engine} 1-point ingest / SQLite floor: {r['floor']['ratio_p50']:.2f} x (no target)")
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1])
        return 0
    harness.snapshot_code()
    results = []
    with contextlib.ExitStack() as stack:
        floor, floor_db = (None, None) if args.skip_floor else stack.enter_context(floor_server())
        for engine in args.engines:
            results.append(bench_engine(engine, args, floor))
        if floor is not None and floor_db is not None:
            results.append(bench_floor_load(floor, floor_db, args))
    targets = report(results)
    harness.write_json(f"load-{args.out}", {"options": vars(args), "results": results, "targets": targets})
    clean = all(r["errors"] == 0 and r["stored_equals_acknowledged"] for r in results)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
