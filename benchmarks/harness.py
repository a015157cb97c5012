"""Shared benchmark machinery: the real server in its own process, throw-away databases, workloads, output.

Every benchmark talks to ``stagewatch serve`` over loopback HTTP, exactly as a worker or the dashboard does,
so the numbers include routing, validation, serialisation and the database, but not the client's own work
(request bodies are encoded before the clock starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

ENGINES = ("sqlite", "postgres")
POSTGRES_ADMIN = os.environ.get("STAGEWATCH_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0
MIGRATE_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 300.0


# --- command line -------------------------------------------------------------------------------------------


def engines_arg(text: str) -> list[str]:
    engines = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise argparse.ArgumentTypeError(f"engines must be a comma-separated subset of {','.join(ENGINES)}")
    return engines


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def bounded_int(limit: int) -> Callable[[str], int]:
    """An argparse type: a positive int of at most ``limit`` (load benchmarks keep their sizes bounded)."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text}: at most {limit:,}")
        return value

    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engines",
        type=engines_arg,
        default=list(ENGINES),
        help="comma-separated databases to benchmark (default: sqlite,postgres)",
    )
    parser.add_argument(
        "--postgres-url",
        default=POSTGRES_ADMIN,
        help="admin connection used to create and drop a throw-away database per run "
        "(default: $STAGEWATCH_BENCH_POSTGRES or %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the generated data (default 1234)")


# --- the server ---------------------------------------------------------------------------------------------


def stagewatch_script() -> Path:
    """The ``stagewatch`` entry point of the interpreter running the benchmark (the project's venv)."""
    script = Path(sys.executable).parent / "stagewatch"
    if not script.exists():
        raise RuntimeError(f"{script} not found: run the benchmarks with the project's virtualenv python")
    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The environment for a ``stagewatch`` child process: this one's, without any ``STAGEWATCH_*`` variable,
    plus ``extra``. Benchmarks that start their own server (other options, other processes) pass it too."""
    # Only what we set: a STAGEWATCH_* variable of the shell running the benchmark must not change the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGEWATCH_")}
    env.update(extra or {})
    return env


def migrate(db_url: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [str(stagewatch_script()), "db", "upgrade", "--db", db_url],
        capture_output=True,
        text=True,
        timeout=MIGRATE_TIMEOUT_S,
        env=server_env(env),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"stagewatch db upgrade failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def create_token(db_url: str, role: str, name: str) -> str:
    """A token made with ``stagewatch token create``, as an admin would (benchmarks that run with auth on)."""
    made = subprocess.run(
        [str(stagewatch_script()), "token", "create", "--role", role, "--name", name, "--db", db_url],
        capture_output=True,
        text=True,
        timeout=MIGRATE_TIMEOUT_S,
        env=server_env(None),
        check=True,
    )
    return made.stdout.strip()


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stops a server process started by a benchmark, if it still runs: ``terminate`` (a graceful shutdown), then
    ``kill`` if it has not exited within ``SERVER_STOP_TIMEOUT_S``; returns once it has exited."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)


@contextmanager
def running_server(db_url: str, *, env: dict[str, str] | None = None) -> Iterator[str]:
    """Migrates ``db_url``, starts ``stagewatch serve --no-auth`` on a free loopback port and yields its base
    URL once ``/healthz`` answers; the process is always stopped (terminate, then kill) on the way out."""
    migrate(db_url, env)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [str(stagewatch_script()), "serve", "--db", db_url, "--port", str(port), "--no-auth"]
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-log-") as logdir:
        log_path = Path(logdir) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(env))
            try:
                wait_healthy(process, base_url, log_path)
                yield base_url
            finally:
                stop_server(process)


def wait_healthy(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    """Returns once the server ``process`` at ``base_url`` answers ``GET /healthz`` with 200. Raises
    ``RuntimeError`` with the tail of its ``log_path`` if it exits first or does not answer within
    ``SERVER_START_TIMEOUT_S``."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while True:
            code = process.poll()
            if code is not None:
                raise RuntimeError(f"stagewatch serve exited with {code}:\n{_tail(log_path)}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"stagewatch serve did not answer /healthz within {SERVER_START_TIMEOUT_S:.0f}s:\n{_tail(log_path)}"
                )
            time.sleep(0.1)


def http_client(base_url: str) -> httpx.Client:
    """One client, one keep-alive connection, generous but bounded timeouts."""
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(HTTP_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def create_run(client: httpx.Client, name: str) -> int:
    response = client.post("/api/v1/runs", json={"name": name, "project": "bench"})
    check_status(response, 201)
    run_id: int = response.json()["id"]
    return run_id


def check_status(response: httpx.Response, expected: int = 200) -> None:
    if response.status_code != expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}, "
            f"expected {expected}: {response.text[:500]}"
        )


# --- databases ----------------------------------------------------------------------------------------------


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A fresh SQLite file in its own temporary directory, removed afterwards (with its WAL files)."""
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'bench.db'}"


@contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN) -> Iterator[str]:
    """A fresh Postgres database ``bench_<random>``, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database(engine: str, admin_url: str = POSTGRES_ADMIN) -> Iterator[str]:
    if engine == "sqlite":
        with sqlite_database() as url:
            yield url
    elif engine == "postgres":
        with postgres_database(admin_url) as url:
            yield url
    else:
        raise ValueError(f"unknown engine {engine!r}")


def analyze(engine: str, db_url: str) -> None:
    """Refresh the planner statistics of the metric tables, as autovacuum (Postgres, within about a minute
    of a bulk load) or a periodic ``ANALYZE`` (SQLite) would; the server itself never runs it."""
    if engine == "postgres":
        with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as pg:
            pg.execute("ANALYZE metric_points")
            pg.execute("ANALYZE metric_rollups")
        return
    database = make_url(db_url).database
    assert database, db_url
    lite = sqlite3.connect(database, timeout=30)
    try:
        lite.execute("ANALYZE metric_points")
        lite.execute("ANALYZE metric_rollups")
        lite.commit()
    finally:
        lite.close()


def engine_version(engine: str, admin_url: str = POSTGRES_ADMIN) -> str:
    if engine == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


# --- workloads ----------------------------------------------------------------------------------------------

BASE_TIME = 1_732_780_800.0  # fixed wall clock, so bodies are byte-identical from one run to the next
SECONDS_PER_STEP = 0.25


def encode(points: list[dict[str, Any]]) -> bytes:
    # allow_nan=False: the API takes "NaN" as a string, a bare NaN token would be invalid JSON.
    return json.dumps({"points": points}, separators=(",", ":"), allow_nan=False).encode()


def encode_tables(points: list[dict[str, Any]]) -> bytes:
    """The same points in the column-wise form (``{"tables": [...]}``), a table per key."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_key.setdefault(point["key"], []).append(point)
    tables = []
    for key, group in by_key.items():
        table: dict[str, Any] = {
            "keys": [key],
            "steps": [p["step"] for p in group],
            "values": [[p["value"] for p in group]],
        }
        for name, field_name in (("epochs", "epoch"), ("times", "time")):
            if any(field_name in p for p in group):
                table[name] = [p.get(field_name) for p in group]
        tables.append(table)
    return json.dumps({"tables": tables}, separators=(",", ":"), allow_nan=False).encode()


def training_batch(rng: random.Random, keys: Sequence[str], first_step: int, steps: int) -> list[dict[str, Any]]:
    """``steps`` consecutive steps of a training loop logging every key at each step."""
    points: list[dict[str, Any]] = []
    for step in range(first_step, first_step + steps):
        t = BASE_TIME + step * SECONDS_PER_STEP
        for key in keys:
            points.append({"key": key, "step": step, "value": _metric(rng, key, step), "time": t})
    return points


def _metric(rng: random.Random, key: str, step: int) -> float:
    if key == "loss":
        return 2.5 * math.exp(-step / 200_000) + 0.3 + rng.gauss(0.0, 0.05)
    if key == "lr":
        return 3e-4 * (0.5 ** (step // 100_000))
    if key == "grad_norm":
        return abs(rng.gauss(1.0, 0.3))
    return rng.random()


@dataclass(frozen=True)
class SeriesPlan:
    """One long ``loss`` series with a spike and a NaN in the middle, which downsampling must keep."""

    points: int
    spike_step: int
    nan_step: int
    spike_value: float = 1000.0

    @classmethod
    def for_points(cls, points: int) -> SeriesPlan:
        return cls(points=points, spike_step=int(points * 0.512345), nan_step=int(points * 0.487654))


def series_batches(plan: SeriesPlan, batch_size: int, seed: int) -> Iterator[bytes]:
    """Encoded request bodies covering steps ``0..plan.points-1`` of the ``loss`` series."""
    rng = random.Random(seed)
    for first in range(0, plan.points, batch_size):
        points: list[dict[str, Any]] = []
        for step in range(first, min(first + batch_size, plan.points)):
            value: float | str = _metric(rng, "loss", step)
            if step == plan.spike_step:
                value = plan.spike_value
            elif step == plan.nan_step:
                value = "NaN"
            points.append({"key": "loss", "step": step, "value": value, "time": BASE_TIME + step * SECONDS_PER_STEP})
        yield encode(points)


def ingest_series(client: httpx.Client, run_id: int, plan: SeriesPlan, batch_size: int, seed: int) -> float:
    """Loads the series; returns the wall time of the uploads alone (bodies are encoded beforehand)."""
    bodies = list(series_batches(plan, batch_size, seed))
    started = time.perf_counter()
    for body in bodies:
        response = post_points(client, run_id, body)
        check_status(response)
    return time.perf_counter() - started


def post_points(client: httpx.Client, run_id: int, body: bytes) -> httpx.Response:
    return client.post(f"/api/v1/runs/{run_id}/metrics", content=body, headers={"content-type": "application/json"})


def server_env_for_batch(batch_size: int) -> dict[str, str]:
    """The server refuses batches over 100,000 points by default; raise the limit only when asked to."""
    return {"STAGEWATCH_MAX_POINTS_PER_BATCH": str(batch_size)} if batch_size > 100_000 else {}


# --- statistics and output ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt_number(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[fmt_number(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        # First column (a label) left-aligned, numbers right-aligned.
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


_CODE_SNAPSHOT: dict[str, Any] = {}


def snapshot_code() -> dict[str, Any]:
    """What is being measured, taken when a benchmark starts (the working tree may change while it runs):
    the git revision, whether the tree was dirty, and a hash of every server source file."""
    if not _CODE_SNAPSHOT:
        digest = hashlib.sha256()
        for path in sorted((REPO_ROOT / "server").rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
        _CODE_SNAPSHOT.update({
            "git": _git_revision(),
            "server_sources_sha256": digest.hexdigest()[:16],
            "taken_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_at_start": _loadavg(),
        })  # fmt: skip
    return dict(_CODE_SNAPSHOT)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_revision() -> str | None:
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "sqlite": sqlite3.sqlite_version,
    }


def command_line() -> str:
    """The command exactly as typed (``python -m benchmarks.bench_ingest --engines sqlite``)."""
    return shlex.join(sys.orig_argv)


def json_safe(value: Any) -> Any:
    """JSON has no NaN: a missing measurement is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "benchmark": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(),
        "cwd": os.getcwd(),
        "code": snapshot_code(),
        "loadavg_at_end": _loadavg(),
        "machine": machine_info(),
        **payload,
    }
    path.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return path


def target_line(label: str, value: float, target: float, unit: str, *, higher_is_better: bool) -> bool:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    verdict = "met" if met else "MISSED"
    print(f"target {label}: {fmt_number(value)} {unit} (want {sign} {fmt_number(target)}) -> {verdict}")
    return met
