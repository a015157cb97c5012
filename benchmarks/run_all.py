"""Runs the ingest, query, export and training-overhead benchmarks one after the other, each on fresh databases.

    .venv/bin/python -m benchmarks.run_all [--engines sqlite,postgres] [--quick]

``--quick`` shrinks every size (a smoke test, not a measurement); the size options override it. Each benchmark
writes benchmarks/results/<name>.json; this script adds results/run_all.json with the targets of all of them.
``train_overhead`` (MNIST-1D training with and without logging, SQLite only) needs torch and mnist1d, and so does
``time_to_accuracy`` (real ``stagewatch train`` workers, 4 schedules x 3 seeds x 60 epochs: about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import (
    bench_dashboard,
    bench_export,
    bench_ingest,
    bench_latency,
    bench_query,
    bench_time_to_accuracy,
    bench_train_overhead,
    harness,
)

QUICK = {"batches": 5, "points": 100_000, "requests": 5, "repeats": 1}
FULL = {"batches": 30, "points": 1_000_000, "requests": 20, "repeats": 3}
BENCHMARKS = ("ingest", "query", "export", "train_overhead", "time_to_accuracy", "latency", "dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the whole suite")
    parser.add_argument(
        "--only",
        type=lambda text: [b for b in text.split(",") if b],
        default=list(BENCHMARKS),
        help="comma-separated subset of " + ",".join(BENCHMARKS),
    )
    parser.add_argument("--batches", type=harness.positive_int, help="ingest: timed batches (default 30, quick 5)")
    parser.add_argument("--batch-size", type=harness.positive_int, default=10_000, help="ingest: points per batch")
    parser.add_argument(
        "--points",
        type=harness.positive_int,
        help="query/export: points in the series (default 1000000, quick 100000)",
    )
    parser.add_argument(
        "--ingest-batch", type=harness.positive_int, default=50_000, help="query/export: points per upload"
    )
    parser.add_argument("--requests", type=harness.positive_int, help="query: timed requests (default 20, quick 5)")
    parser.add_argument("--repeats", type=harness.positive_int, help="export: timed exports (default 3, quick 1)")
    return parser


def _size(args: argparse.Namespace, name: str) -> int:
    value: int | None = getattr(args, name)
    if value is not None:
        return value
    return (QUICK if args.quick else FULL)[name]


def plans(args: argparse.Namespace) -> list[tuple[str, Callable[[Sequence[str] | None], int], list[str]]]:
    common = [
        "--engines",
        ",".join(args.engines),
        "--postgres-url",
        args.postgres_url,
        "--seed",
        str(args.seed),
    ]
    series = ["--points", str(_size(args, "points")), "--ingest-batch", str(args.ingest_batch)]
    every = {
        "ingest": (
            bench_ingest.main,
            [*common, "--batches", str(_size(args, "batches")), "--batch-size", str(args.batch_size)],
        ),
        "query": (bench_query.main, [*common, *series, "--requests", str(_size(args, "requests"))]),
        "export": (bench_export.main, [*common, *series, "--repeats", str(_size(args, "repeats"))]),
        "train_overhead": (bench_train_overhead.main, ["--quick"] if args.quick else []),
        "time_to_accuracy": (bench_time_to_accuracy.main, ["--quick"] if args.quick else []),
        "latency": (bench_latency.main, [*common, *(["--quick"] if args.quick else [])]),
        "dashboard": (bench_dashboard.main, ["--quick"] if args.quick else []),  # SQLite, Chromium
    }
    unknown = set(args.only) - set(every)
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    return [(name, *every[name]) for name in BENCHMARKS if name in args.only]


def _display(unit: str, value: float, target: float) -> tuple[str, str]:
    """Durations in ms, rates as they are."""
    if unit == "s":
        return f"{value * 1e3:.1f} ms", f"{target * 1e3:.0f} ms"
    return harness.fmt_number(value), harness.fmt_number(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    harness.snapshot_code()
    summary: dict[str, Any] = {}
    for name, run, bench_argv in plans(args):
        print(f"\n=== {name}: python -m benchmarks.bench_{name} {' '.join(bench_argv)}", flush=True)
        started = time.perf_counter()
        try:
            code = run(bench_argv)
        except Exception:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            code = 1
        summary[name] = {"argv": bench_argv, "exit": code, "wall_s": time.perf_counter() - started}
        if code:
            print(f"{name} failed with exit status {code}")
    targets: dict[str, Any] = {}
    for name in summary:
        path = harness.RESULTS_DIR / f"{name}.json"
        if summary[name]["exit"] == 0 and path.exists():
            targets[name] = json.loads(path.read_text()).get("targets", {})
    print("\n=== targets")
    rows = [
        [f"{bench}: {key}", *_display(t.get("unit", ""), t["value"], t["target"]), t["met"]]
        for bench, ts in targets.items()
        for key, t in ts.items()
    ]
    harness.print_table("Targets", ["target", "value", "want", "met"], rows)
    harness.write_json("run_all", {"options": vars(args), "benchmarks": summary, "targets": targets})
    return max((s["exit"] for s in summary.values()), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
