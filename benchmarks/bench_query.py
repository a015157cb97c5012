"""Downsampled series queries over real HTTP on a 1,000,000-point series.

Loads one ``loss`` series (with a spike of 1000.0 and a NaN in the middle), then times the dashboard's
full-range query ``GET /api/v1/runs/{id}/metrics?key=loss&max_points=2000`` and a zoomed one (steps 40%..60%),
checking every response: at most ``max_points`` points, ``downsampled`` true, the spike and the NaN present.

    .venv/bin/python -m benchmarks.bench_query [--engines sqlite,postgres] [--points 1000000] [--requests 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx

from benchmarks import harness

NAME = "query"
TARGET_FULL_RANGE_S = 0.100  # on SQLite


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_query", description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--points",
        type=harness.positive_int,
        default=1_000_000,
        help="points in the series (default 1000000)",
    )
    parser.add_argument(
        "--ingest-batch", type=harness.positive_int, default=50_000, help="points per upload (default 50000)"
    )
    parser.add_argument(
        "--requests", type=harness.positive_int, default=20, help="timed requests per query (default 20)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per query first (default 3)")
    parser.add_argument("--max-points", type=int, default=2000, help="max_points of the queries (default 2000)")
    parser.add_argument(
        "--no-analyze",
        dest="analyze",
        action="store_false",
        help="skip the second round, measured after ANALYZE of the metric tables",
    )
    parser.add_argument(
        "--zoom",
        default="0.4:0.6",
        help="zoomed step range as fractions of the series, LO:HI (default 0.4:0.6, i.e. 400000..600000)",
    )
    return parser


def _zoom(text: str, points: int) -> tuple[int, int]:
    lo, hi = (float(x) for x in text.split(":"))
    if not 0 <= lo < hi <= 1:
        raise SystemExit(f"--zoom {text}: want 0 <= LO < HI <= 1")
    return int(points * lo), int(points * hi)


def verify(body: dict[str, Any], plan: harness.SeriesPlan, lo: int, hi: int, max_points: int) -> dict[str, Any]:
    """Checks one response; returns what was seen."""
    (series,) = body["series"]
    steps: list[int] = series["steps"]
    values: list[float | str] = series["values"]
    problems = []
    if len(steps) > max_points:
        problems.append(f"{len(steps)} points > max_points {max_points}")
    expected_total = min(hi, plan.points - 1) - lo + 1
    if series["total_points"] != expected_total:
        problems.append(f"total_points {series['total_points']}, expected {expected_total}")
    if expected_total > max_points and not series["downsampled"]:
        problems.append("downsampled is false")
    by_step = dict(zip(steps, values, strict=True))
    spike_kept = lo <= plan.spike_step <= hi and by_step.get(plan.spike_step) == plan.spike_value
    nan_kept = lo <= plan.nan_step <= hi and by_step.get(plan.nan_step) == "NaN"
    if lo <= plan.spike_step <= hi and not spike_kept:
        problems.append(f"spike at step {plan.spike_step} missing (got {by_step.get(plan.spike_step)!r})")
    if lo <= plan.nan_step <= hi and not nan_kept:
        problems.append(f"NaN at step {plan.nan_step} missing (got {by_step.get(plan.nan_step)!r})")
    if steps != sorted(steps):
        problems.append("steps are not in order")
    if problems:
        raise RuntimeError(f"bad response for steps {lo}..{hi}: " + "; ".join(problems))
    return {
        "returned_points": len(steps),
        "total_points": series["total_points"],
        "downsampled": series["downsampled"],
        "spike_kept": spike_kept,
        "nan_kept": nan_kept,
    }


def time_query(
    client: httpx.Client, path: str, params: dict[str, Any], args: argparse.Namespace, check: Any
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    latencies: list[float] = []
    size = 0
    for i in range(args.warmup + args.requests):
        started = time.perf_counter()
        response = client.get(path, params=params)  # reads the whole body
        elapsed = time.perf_counter() - started
        harness.check_status(response)
        seen = check(response.json())
        size = len(response.content)
        if i >= args.warmup:
            latencies.append(elapsed)
    return {
        "params": params,
        "requests": args.requests,
        "response_bytes": size,
        **seen,
        "latency_s": {
            "median": statistics.median(latencies),
            "p95": harness.percentile(latencies, 95),
            "min": min(latencies),
            "max": max(latencies),
            "all": latencies,
        },
    }


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = harness.SeriesPlan.for_points(args.points)
    zoom_lo, zoom_hi = _zoom(args.zoom, args.points)
    env = harness.server_env_for_batch(args.ingest_batch)
    with (
        harness.database(engine, args.postgres_url) as url,
        harness.running_server(url, env=env) as base,
        harness.http_client(base) as client,
    ):
        run_id = harness.create_run(client, f"bench-query-{engine}")
        ingest_s = harness.ingest_series(client, run_id, plan, args.ingest_batch, args.seed)
        path = f"/api/v1/runs/{run_id}/metrics"
        full_params = {"key": "loss", "max_points": args.max_points}
        zoom_params = {"key": "loss", "min_step": zoom_lo, "max_step": zoom_hi, "max_points": args.max_points}

        def check_full(body: dict[str, Any]) -> dict[str, Any]:
            return verify(body, plan, 0, 2**62, args.max_points)

        def check_zoom(body: dict[str, Any]) -> dict[str, Any]:
            return verify(body, plan, zoom_lo, zoom_hi, args.max_points)

        # First as the server finds the data right after loading it (no planner statistics yet) ...
        queries = {
            "full": time_query(client, path, full_params, args, check_full),
            "zoom": time_query(client, path, zoom_params, args, check_zoom),
        }
        # ... then as it is once statistics exist (autovacuum's ANALYZE, a minute or so later on Postgres).
        if args.analyze:
            harness.analyze(engine, url)
            queries["full, analyzed"] = time_query(client, path, full_params, args, check_full)
            queries["zoom, analyzed"] = time_query(client, path, zoom_params, args, check_zoom)
    return {
        "engine": engine,
        "engine_version": harness.engine_version(engine, args.postgres_url),
        "series_points": args.points,
        "spike_step": plan.spike_step,
        "nan_step": plan.nan_step,
        "ingest": {"batch": args.ingest_batch, "wall_s": ingest_s, "points_per_s": args.points / ingest_s},
        "queries": queries,
    }


def report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for r in results:
        for name, q in r["queries"].items():
            params = q["params"]
            span = f"{params.get('min_step', 0)}..{params.get('max_step', r['series_points'] - 1)}"
            rows.append(
                [
                    r["engine"],
                    name,
                    span,
                    q["total_points"],
                    q["returned_points"],
                    q["response_bytes"] / 1024,
                    q["latency_s"]["median"] * 1e3,
                    q["latency_s"]["p95"] * 1e3,
                    q["latency_s"]["max"] * 1e3,
                    q["spike_kept"],
                    q["nan_kept"],
                ]
            )
    harness.print_table(
        f"Series queries, max_points {results[0]['queries']['full']['params']['max_points']} "
        f"({results[0]['queries']['full']['requests']} timed requests each, after warm-up)",
        [
            "engine",
            "query",
            "steps",
            "in range",
            "returned",
            "KiB",
            "median ms",
            "p95 ms",
            "max ms",
            "spike",
            "NaN",
        ],
        rows,
    )
    harness.print_table(
        "Loading the series",
        ["engine", "points", "batch", "wall s", "points/s"],
        [
            [
                r["engine"],
                r["series_points"],
                r["ingest"]["batch"],
                r["ingest"]["wall_s"],
                r["ingest"]["points_per_s"],
            ]
            for r in results
        ],
    )
    targets: dict[str, Any] = {}
    for r in results:
        if r["engine"] == "sqlite":
            median = r["queries"]["full"]["latency_s"]["median"]
            met = harness.target_line(
                "sqlite full-range query (median)",
                median * 1e3,
                TARGET_FULL_RANGE_S * 1e3,
                "ms",
                higher_is_better=False,
            )
            targets["sqlite_full_range_median_s"] = {
                "target": TARGET_FULL_RANGE_S,
                "value": median,
                "met": met,
                "unit": "s",
            }
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    harness.snapshot_code()
    results = []
    for engine in args.engines:
        print(
            f"[query] {engine}: loading {args.points:,} points, then {args.requests} requests per query ...",
            flush=True,
        )
        results.append(bench_engine(engine, args))
    targets = report(results)
    harness.write_json(NAME, {"options": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
