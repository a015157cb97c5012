"""Where the server's time goes: the real app under uvicorn in a child process, driven over HTTP.

Two ways to look (``--mode``):

* ``phases`` (default): the hot functions of the store, the routes and FastAPI are wrapped with wall-clock
  timers (negligible overhead), giving an undistorted share of each request's time per phase.
* ``cprofile``: cProfile on the event-loop thread *and* on every worker-thread call (sync endpoints, the
  ingest handler and the export generator run in anyio's thread pool), merged into one pstats table.

Only the workload's own requests are measured: setup (loading a million points) is excluded via a reset.
Nothing in ``server/`` is modified; the wrappers are installed in the child process at start-up.

    .venv/bin/python -m benchmarks.profile_server --workload ingest|query|export [--engine sqlite] [--mode phases]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pstats
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import bench_ingest, harness

RESET_PATH = "/__profile/reset"
DUMP_PATH = "/__profile/dump"

# --- the child: the app with instrumentation ---------------------------------------------------------------


class Phases:
    """Wall time per wrapped function (inclusive), for one thread at a time: the driver sends one request
    at a time, so nested phases never overlap across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def reset(self) -> None:
        with self.lock:
            self.totals.clear()

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        if getattr(func, "__wrapped_phase__", None):
            return func

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        timed.__wrapped_phase__ = True  # type: ignore[attr-defined]
        return timed

    def wrap_async(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        return timed

    def wrap_iterator(self, name: str, func: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """Time spent inside a generator (its ``next`` calls), not the time its consumer holds it."""

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            iterator = func(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self.add(name, time.perf_counter() - started)
                    return
                self.add(name, time.perf_counter() - started)
                yield item

        return timed

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            entry = self.totals[name]
            entry[0] += 1
            entry[1] += seconds

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: {"calls": v[0], "seconds": v[1]} for k, v in self.totals.items()}


def _install_phases(phases: Phases) -> None:
    import fastapi.routing
    import starlette.responses
    from sqlalchemy.orm import SessionTransaction

    import server.routes.metrics as routes
    import server.store.export as export
    import server.store.metrics as metrics
    import server.store.rollups as rollups
    import server.store.series as series

    def patch(owner: Any, name: str, label: str, kind: str = "sync") -> None:
        # The server changes under the benchmarks: a function that is gone is reported, not fatal.
        original = getattr(owner, name, None)
        if original is None:
            print(f"profile: {getattr(owner, '__name__', owner)}.{name} not found, not timed", file=sys.stderr)
            return
        wrap = {"sync": phases.wrap, "async": phases.wrap_async, "iterator": phases.wrap_iterator}[kind]
        setattr(owner, name, wrap(label, original))

    # Ingest: the route's worker-thread function, body validation, and the store's steps.
    patch(routes, "_ingest", "route: _ingest (worker thread, incl. validation and commit)")
    import server.ingest_route as ingest_route  # the fast route calls its own reference to it

    patch(ingest_route, "_ingest", "route: _ingest (worker thread, incl. validation and commit)")
    adapter = getattr(routes, "metric_batch_adapter")  # noqa: B009
    timed_validate = phases.wrap("ingest: metric_batch_adapter.validate_json", adapter.validate_json)

    class TimedAdapter:
        def __getattr__(self, name: str) -> Any:
            return getattr(adapter, name)

        def validate_json(self, *args: Any, **kwargs: Any) -> Any:
            return timed_validate(*args, **kwargs)

    setattr(routes, "metric_batch_adapter", TimedAdapter())  # noqa: B010
    patch(routes, "get_run", "get_run")
    patch(metrics, "ingest", "ingest: store.ingest")
    patch(routes, "from_request", "ingest: batch.from_request (the body as columns)")
    for name in ("_series_for", "_split_stored", "_advance_latest", "heartbeat"):
        patch(metrics, name, f"ingest: {name}")
    patch(rollups, "add_points", "ingest: rollups.add_points")
    patch(rollups, "summarise", "ingest: rollups.summarise (Python)")
    patch(rollups, "_base_level", "ingest: rollups._base_level (Python)")
    patch(rollups, "_merge_statement", "ingest: rollups._merge_statement (build SQL)")
    patch(SessionTransaction, "commit", "SessionTransaction.commit (COMMIT, incl. flush)")

    # Query.
    patch(routes, "query_series", "query: query_series")
    patch(routes, "series_of", "query: series_of")
    patch(routes, "SeriesResult", "query: SeriesResult(...) (validation)")
    for name in ("_raw", "_bounds", "_bucket_extremes", "_points_at", "_out"):
        patch(series, name, f"query: {name}")
    patch(rollups, "read_level", "query: rollups.read_level")
    patch(fastapi.routing, "serialize_response", "fastapi: serialize_response (validate + dump)", "async")
    patch(starlette.responses.JSONResponse, "render", "starlette: JSONResponse.render")

    # Export: the generator's own time, and the formatting inside it.
    patch(export, "_format", "export: _format (Python formatting)")
    patch(routes, "export_points", "export: export_points (fetch + format)", "iterator")


class ThreadProfiles:
    """cProfile in worker threads: each call run through anyio's thread pool is profiled by the profiler of
    the thread it runs on; at the end all of them are merged with the event loop's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.profiles: list[cProfile.Profile] = []
        self.local = threading.local()
        self.generation = 0

    def reset(self) -> None:
        with self.lock:
            self.generation += 1
            self.profiles = []

    def run(self, func: Callable[[], Any]) -> Any:
        profile: cProfile.Profile | None = getattr(self.local, "profile", None)
        if profile is None or getattr(self.local, "generation", -1) != self.generation:
            profile = cProfile.Profile()
            with self.lock:
                self.profiles.append(profile)
            self.local.profile, self.local.generation = profile, self.generation
        profile.enable()
        try:
            return func()
        finally:
            profile.disable()


def serve(args: argparse.Namespace) -> int:
    import anyio.to_thread
    import uvicorn
    from fastapi.responses import JSONResponse

    from server.app import create_app
    from server.settings import Settings

    phases = Phases()
    threads = ThreadProfiles()
    main_profile: list[cProfile.Profile] = []

    if args.mode == "phases":
        _install_phases(phases)
    else:
        original_run_sync = anyio.to_thread.run_sync

        async def profiled_run_sync(func: Callable[..., Any], *a: Any, **kw: Any) -> Any:
            return await original_run_sync(functools.partial(threads.run, functools.partial(func, *a)), **kw)

        setattr(anyio.to_thread, "run_sync", profiled_run_sync)  # noqa: B010

    app = create_app(Settings(database_url=args.db, port=args.port, auth=False))

    @app.post(RESET_PATH, include_in_schema=False)
    async def reset() -> JSONResponse:
        phases.reset()
        threads.reset()
        if args.mode == "cprofile":
            if main_profile:
                main_profile[-1].disable()
            main_profile.append(cProfile.Profile())
            main_profile[-1].enable()
        return JSONResponse({"ok": True})

    @app.post(DUMP_PATH, include_in_schema=False)
    async def dump() -> JSONResponse:
        if args.mode == "cprofile":
            if main_profile:
                main_profile[-1].disable()
            stats = pstats.Stats(main_profile[-1]) if main_profile else None
            for profile in threads.profiles:
                if stats is None:
                    stats = pstats.Stats(profile)
                else:
                    stats.add(profile)
            if stats is not None:
                stats.dump_stats(args.out)
        else:
            Path(args.out).write_text(json.dumps(phases.snapshot()))
        return JSONResponse({"ok": True})

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# --- the driver ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def profiled_server(db_url: str, mode: str, out: Path) -> Iterator[str]:
    harness.migrate(db_url)
    port = harness.free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "benchmarks.profile_server", "--serve",
        "--db", db_url, "--port", str(port), "--mode", mode, "--out", str(out),
    ]  # fmt: skip
    log_path = out.with_suffix(".log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=harness.REPO_ROOT)
        try:
            harness.wait_healthy(process, base, log_path)
            yield base
        finally:
            harness.stop_server(process)


def drive(workload: str, client: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Sets up (unmeasured), resets the profiler, runs the measured requests; returns client-side timings."""
    run_id = harness.create_run(client, f"profile-{workload}")
    timings: list[float] = []
    if workload == "ingest":
        rng = random.Random(args.seed)
        keys = bench_ingest.KEYS[: args.keys]
        steps = args.batch_size // len(keys)
        encode = harness.encode_tables if args.form == "tables" else harness.encode
        bodies = [encode(harness.training_batch(rng, keys, i * steps, steps)) for i in range(2 + args.batches)]
        for body in bodies[:2]:
            harness.check_status(harness.post_points(client, run_id, body))
        harness.check_status(client.post(RESET_PATH))
        for body in bodies[2:]:
            started = time.perf_counter()
            harness.check_status(harness.post_points(client, run_id, body))
            timings.append(time.perf_counter() - started)
        return {"requests": len(timings), "points": len(timings) * steps * len(keys), "client_s": timings}
    plan = harness.SeriesPlan.for_points(args.points)
    harness.ingest_series(client, run_id, plan, 50_000, args.seed)
    if workload == "query":
        path = f"/api/v1/runs/{run_id}/metrics"
        params = {"key": "loss", "max_points": 2000}
        for _ in range(3):
            harness.check_status(client.get(path, params=params))
        harness.check_status(client.post(RESET_PATH))
        for _ in range(args.requests):
            started = time.perf_counter()
            harness.check_status(client.get(path, params=params))
            timings.append(time.perf_counter() - started)
        return {"requests": len(timings), "client_s": timings}
    path = f"/api/v1/runs/{run_id}/metrics/export"
    harness.check_status(client.post(RESET_PATH))
    for fmt in ("csv", "jsonl"):
        started = time.perf_counter()
        with client.stream("GET", path, params={"format": fmt}) as response:
            harness.check_status(response)
            for _chunk in response.iter_bytes():
                pass
        timings.append(time.perf_counter() - started)
    return {"requests": len(timings), "points": 2 * args.points, "client_s": timings}


def report_phases(data: dict[str, dict[str, float]], client_total: float, requests: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, v in sorted(data.items(), key=lambda kv: -kv[1]["seconds"]):
        if v["calls"] == 0:
            continue
        rows.append([
            name, int(v["calls"]), v["seconds"] * 1e3 / requests, 100 * v["seconds"] / client_total,
        ])  # fmt: skip
    harness.print_table(
        f"Server phases (inclusive wall time; client saw {client_total * 1e3 / requests:.1f} ms per request)",
        ["phase", "calls", "ms/request", "% of client time"],
        rows,
    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_server", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["ingest", "query", "export"], default="ingest")
    parser.add_argument("--engine", choices=harness.ENGINES, default="sqlite")
    parser.add_argument("--mode", choices=["phases", "cprofile"], default="phases")
    parser.add_argument("--postgres-url", default=harness.POSTGRES_ADMIN)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batches", type=harness.positive_int, default=30, help="ingest: timed batches")
    parser.add_argument("--batch-size", type=harness.positive_int, default=10_000, help="ingest: points per batch")
    parser.add_argument("--form", choices=["points", "tables"], default="points", help="ingest: the body's form")
    parser.add_argument("--keys", type=harness.positive_int, default=4, help="ingest: keys per batch (at most 4)")
    parser.add_argument("--points", type=harness.positive_int, default=1_000_000, help="query/export: series size")
    parser.add_argument("--requests", type=harness.positive_int, default=20, help="query: timed requests")
    parser.add_argument("--top", type=int, default=30, help="cprofile: rows to print (default 30)")
    parser.add_argument("--sort", default="tottime", help="cprofile: pstats sort key (default tottime)")
    parser.add_argument("--callers", help="cprofile: also print who calls the functions matching this regex")
    # The child process.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    harness.snapshot_code()

    with tempfile.TemporaryDirectory(prefix="stagewatch-profile-") as tmp:
        out = Path(tmp) / ("profile.pstats" if args.mode == "cprofile" else "phases.json")
        with (
            harness.database(args.engine, args.postgres_url) as url,
            profiled_server(url, args.mode, out) as base,
            harness.http_client(base) as client,
        ):
            measured = drive(args.workload, client, args)
            harness.check_status(client.post(DUMP_PATH))
        client_total = sum(measured["client_s"])
        print(
            f"{args.workload} on {args.engine}: {measured['requests']} requests, client wall "
            f"{client_total:.3f} s ({client_total * 1e3 / measured['requests']:.1f} ms/request)"
            + (f", {measured['points'] / client_total:,.0f} points/s" if "points" in measured else "")
        )
        payload: dict[str, Any] = {"options": vars(args), "client": measured}
        if args.mode == "phases":
            phases = json.loads(out.read_text())
            report_phases(phases, client_total, measured["requests"])
            payload["phases"] = phases
        else:
            buffer = io.StringIO()
            stats = pstats.Stats(str(out), stream=buffer)
            stats.sort_stats(args.sort).print_stats(args.top)
            if args.callers:
                stats.print_callers(args.callers)
            text = buffer.getvalue()
            print(text)
            payload["pstats_text"] = text
    harness.write_json(f"profile_{args.workload}_{args.engine}_{args.mode}", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
