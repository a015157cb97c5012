"""Batch ingest over real HTTP: points/s and per-batch latency, plus the cost of an identical resend.

A training loop logs ``loss``, ``lr``, ``grad_norm`` and ``accuracy`` at every step, and a worker posts them
10,000 points at a time over one keep-alive connection. Bodies are encoded before the clock starts, so the
numbers are the server's (HTTP, validation, SQL), not the client's JSON encoder. The same batches go in both
wire forms, taking turns batch by batch, each form into a run of its own: column-wise (``{"tables": [...]}``,
what the Python client sends; the target is judged on it) and an object per point (``{"points": [...]}``).

    .venv/bin/python -m benchmarks.bench_ingest [--engines sqlite,postgres] [--batches 30] [--batch-size N]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from benchmarks import harness

NAME = "ingest"
KEYS = ("loss", "lr", "grad_norm", "accuracy")
TARGET_POINTS_PER_S = 150_000  # on either engine (issue 14)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ingest", description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--batches", type=harness.positive_int, default=30, help="timed batches (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    parser.add_argument(
        "--batch-size", type=harness.positive_int, default=10_000, help="points per batch (default 10000)"
    )
    parser.add_argument(
        "--keys",
        type=int,
        choices=range(1, len(KEYS) + 1),
        default=len(KEYS),
        help="metric keys per step (default 4)",
    )
    parser.add_argument("--resends", type=int, default=5, help="identical resends of the last batch, timed (default 5)")
    return parser


def _post(client: httpx.Client, run_id: int, body: bytes) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = harness.post_points(client, run_id, body)
    elapsed = time.perf_counter() - started
    harness.check_status(response)
    result: dict[str, Any] = response.json()
    return elapsed, result


FORMS = ("tables", "points")  # the first is the Python client's and is judged; the other is reported beside it
ENCODERS = {"tables": harness.encode_tables, "points": harness.encode}


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = KEYS[: args.keys]
    steps_per_batch = max(1, args.batch_size // len(keys))
    points_per_batch = steps_per_batch * len(keys)
    rng = random.Random(args.seed)
    batches = [
        harness.training_batch(rng, keys, i * steps_per_batch, steps_per_batch)
        for i in range(args.warmup + args.batches)
    ]
    bodies = {form: [ENCODERS[form](batch) for batch in batches] for form in FORMS}
    env = harness.server_env_for_batch(points_per_batch)
    with (
        harness.database(engine, args.postgres_url) as url,
        harness.running_server(url, env=env) as base,
        harness.http_client(base) as client,
    ):
        runs = {form: harness.create_run(client, f"bench-ingest-{engine}-{form}") for form in FORMS}
        for i in range(args.warmup):
            for form in FORMS:
                _post(client, runs[form], bodies[form][i])

        # The forms take turns batch by batch, each into its own run: a slow spell of the machine hits both.
        latencies: dict[str, list[float]] = {form: [] for form in FORMS}
        for i in range(args.warmup, args.warmup + args.batches):
            for form in FORMS:
                elapsed, result = _post(client, runs[form], bodies[form][i])
                if result["inserted"] != points_per_batch:
                    raise RuntimeError(f"{form}: expected {points_per_batch} inserted, got {result}")
                latencies[form].append(elapsed)

        resend_latencies: list[float] = []
        last = bodies[FORMS[0]][-1]
        for _ in range(args.resends):
            elapsed, result = _post(client, runs[FORMS[0]], last)
            if result["inserted"] != 0 or result["duplicates"] != points_per_batch:
                raise RuntimeError(f"a resend should be all duplicates, got {result}")
            resend_latencies.append(elapsed)

        expected = (args.warmup + args.batches) * steps_per_batch
        for form, run_id in runs.items():
            response = client.get(f"/api/v1/runs/{run_id}")
            harness.check_status(response)
            stored = {k: v["count"] for k, v in response.json()["latest"].items()}
            if stored != dict.fromkeys(keys, expected):
                raise RuntimeError(f"{form}: stored counts {stored}, expected {expected} per key")

    total = points_per_batch * args.batches
    resend_total = sum(resend_latencies)
    forms = {}
    for form in FORMS:
        lat = latencies[form]
        forms[form] = {
            "body_bytes": len(bodies[form][-1]),
            "wall_s": sum(lat),
            "points_per_s": total / sum(lat),
            "batch_latency_s": {
                "p50": harness.percentile(lat, 50),
                "p95": harness.percentile(lat, 95),
                "max": max(lat),
                "all": lat,
            },
        }
    return {
        "engine": engine,
        "engine_version": harness.engine_version(engine, args.postgres_url),
        "keys": list(keys),
        "points_per_batch": points_per_batch,
        "batches": args.batches,
        "warmup_batches": args.warmup,
        "points": total,
        # the judged form's figures at the top level, as before the forms were compared
        **forms[FORMS[0]],
        "forms": forms,
        "resend": {
            "count": args.resends,
            "points_per_s": points_per_batch * args.resends / resend_total if resend_total else None,
            "latency_s": {
                "p50": harness.percentile(resend_latencies, 50),
                "p95": harness.percentile(resend_latencies, 95),
                "all": resend_latencies,
            },
        },
    }


def report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    harness.print_table(
        "Batch ingest (timed batches only; one keep-alive connection)",
        ["engine", "form", "batches", "pts/batch", "body KB", "points", "wall s", "points/s", "p50 ms", "p95 ms"],
        [
            [
                r["engine"],
                form,
                r["batches"],
                r["points_per_batch"],
                f["body_bytes"] / 1024,
                r["points"],
                f["wall_s"],
                f["points_per_s"],
                f["batch_latency_s"]["p50"] * 1e3,
                f["batch_latency_s"]["p95"] * 1e3,
            ]
            for r in results
            for form, f in r["forms"].items()
        ],
    )
    harness.print_table(
        "Identical resend of the last batch (all duplicates, nothing stored)",
        ["engine", "resends", "points/s", "p50 ms", "p95 ms"],
        [
            [
                r["engine"],
                r["resend"]["count"],
                r["resend"]["points_per_s"] or float("nan"),
                r["resend"]["latency_s"]["p50"] * 1e3,
                r["resend"]["latency_s"]["p95"] * 1e3,
            ]
            for r in results
        ],
    )
    targets: dict[str, Any] = {}
    for r in results:
        engine = r["engine"]
        met = harness.target_line(
            f"{engine} ingest ({FORMS[0]})", r["points_per_s"], TARGET_POINTS_PER_S, "points/s", higher_is_better=True
        )
        targets[f"{engine}_points_per_s"] = {
            "target": TARGET_POINTS_PER_S,
            "value": r["points_per_s"],
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
            f"[ingest] {engine}: {args.warmup} + {args.batches} batches of {args.batch_size} points ...",
            flush=True,
        )
        results.append(bench_engine(engine, args))
    targets = report(results)
    harness.write_json(NAME, {"options": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
