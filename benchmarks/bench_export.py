"""Full-resolution export of a 1,000,000-point series, streamed over real HTTP as CSV, JSON lines and Parquet.

Two clients read each export: httpx (iterating the bytes as they arrive and counting lines) and, when it is
installed, curl writing to a file. The machine's cores are shared by client and server, so the lighter
client (curl, C) shows more of the server's own rate; both are reported. Every export must contain every point
(lines for CSV and JSON lines, rows in the file's metadata for Parquet).

    .venv/bin/python -m benchmarks.bench_export [--engines sqlite,postgres] [--points 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

from benchmarks import harness

NAME = "export"
FORMATS = ("csv", "jsonl", "parquet")
TARGET_POINTS_PER_S = 500_000


def formats_arg(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise argparse.ArgumentTypeError(f"formats must be a comma-separated subset of {','.join(FORMATS)}")
    return formats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_export", description=__doc__.split("\n")[0])
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
    parser.add_argument("--repeats", type=harness.positive_int, default=3, help="timed exports per format (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed exports per format first (default 1)")
    parser.add_argument("--formats", type=formats_arg, default=list(FORMATS), help="default: csv,jsonl,parquet")
    parser.add_argument(
        "--clients",
        default="httpx,curl" if shutil.which("curl") else "httpx",
        help="comma-separated: httpx, curl (default: both when curl is installed)",
    )
    return parser


def stream_once_curl(base: str, path: str, fmt: str) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        started = time.perf_counter()
        done = subprocess.run(
            ["curl", "-sS", "--fail", "-o", str(out), "-w", "%{time_starttransfer}", f"{base}{path}?format={fmt}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        wall = time.perf_counter() - started
        data = out.read_bytes()
    return {"wall_s": wall, "first_byte_s": float(done.stdout), "lines": records(fmt, data), "bytes": len(data)}


def records(fmt: str, data: bytes) -> int:
    """Lines of a text export; rows of a Parquet file (from its footer)."""
    if fmt == "parquet":
        return int(pq.read_metadata(io.BytesIO(data)).num_rows)
    return data.count(b"\n")


def stream_once(client: httpx.Client, path: str, fmt: str) -> dict[str, float | int]:
    lines = size = 0
    first_byte = None
    kept: list[bytes] = []  # Parquet is counted from its footer, at the end
    started = time.perf_counter()
    with client.stream("GET", path, params={"format": fmt}) as response:
        harness.check_status(response)
        for chunk in response.iter_bytes():
            if first_byte is None:
                first_byte = time.perf_counter() - started
            if fmt == "parquet":
                kept.append(chunk)
            else:
                lines += chunk.count(b"\n")
            size += len(chunk)
    if fmt == "parquet":
        lines = records(fmt, b"".join(kept))
    return {
        "wall_s": time.perf_counter() - started,
        "first_byte_s": first_byte or 0.0,
        "lines": lines,
        "bytes": size,
    }


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = harness.SeriesPlan.for_points(args.points)
    env = harness.server_env_for_batch(args.ingest_batch)
    exports: dict[str, Any] = {}
    with (
        harness.database(engine, args.postgres_url) as url,
        harness.running_server(url, env=env) as base,
        harness.http_client(base) as client,
    ):
        run_id = harness.create_run(client, f"bench-export-{engine}")
        ingest_s = harness.ingest_series(client, run_id, plan, args.ingest_batch, args.seed)
        path = f"/api/v1/runs/{run_id}/metrics/export"
        for fmt in args.formats:
            for reader in args.clients.split(","):
                expected_lines = args.points + (1 if fmt == "csv" else 0)  # CSV has a header line
                runs = []
                for i in range(args.warmup + args.repeats):
                    if reader == "curl":
                        measured = stream_once_curl(base, path, fmt)
                    else:
                        measured = stream_once(client, path, fmt)
                    if measured["lines"] != expected_lines:
                        raise RuntimeError(f"{fmt} export: {measured['lines']} lines, expected {expected_lines}")
                    if i >= args.warmup:
                        runs.append(measured)
                walls = [float(r["wall_s"]) for r in runs]
                median = statistics.median(walls)
                exports[f"{fmt} ({reader})"] = {
                    "repeats": args.repeats,
                    "lines": runs[-1]["lines"],
                    "bytes": runs[-1]["bytes"],
                    "wall_s": {"median": median, "min": min(walls), "max": max(walls), "all": walls},
                    "first_byte_s": statistics.median(float(r["first_byte_s"]) for r in runs),
                    "points_per_s": args.points / median,
                    "mib_per_s": runs[-1]["bytes"] / median / 2**20,
                }
    return {
        "engine": engine,
        "engine_version": harness.engine_version(engine, args.postgres_url),
        "series_points": args.points,
        "ingest": {"batch": args.ingest_batch, "wall_s": ingest_s, "points_per_s": args.points / ingest_s},
        "exports": exports,
    }


def report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    repeats = next(iter(results[0]["exports"].values()))["repeats"]
    harness.print_table(
        f"Full-resolution export, streamed (median of {repeats})",
        ["engine", "format", "points", "MiB", "first byte ms", "wall s", "points/s", "MiB/s"],
        [
            [
                r["engine"],
                fmt,
                r["series_points"],
                e["bytes"] / 2**20,
                e["first_byte_s"] * 1e3,
                e["wall_s"]["median"],
                e["points_per_s"],
                e["mib_per_s"],
            ]
            for r in results
            for fmt, e in r["exports"].items()
        ],
    )
    targets: dict[str, Any] = {}
    for r in results:
        for fmt, e in r["exports"].items():
            if fmt.startswith("parquet"):  # reported; the target is for the text formats
                continue
            label = f"{r['engine']} {fmt} export"
            met = harness.target_line(label, e["points_per_s"], TARGET_POINTS_PER_S, "points/s", higher_is_better=True)
            targets[f"{r['engine']}_{fmt}_points_per_s"] = {
                "target": TARGET_POINTS_PER_S,
                "value": e["points_per_s"],
                "met": met,
                "unit": "points/s",
            }
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    harness.snapshot_code()
    results = []
    for engine in args.engines:
        print(
            f"[export] {engine}: loading {args.points:,} points, then exporting {','.join(args.formats)} ...",
            flush=True,
        )
        results.append(bench_engine(engine, args))
    targets = report(results)
    harness.write_json(NAME, {"options": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
