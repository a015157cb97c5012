"""Cost of one ``run.log({...}, step=i, epoch=e)`` call (3 keys) in the training loop, server up and server down.

Each call's cost is measured in batches of ``--batch`` calls with ``time.perf_counter_ns`` (so the timer's
own cost is spread over the batch); the median per-call cost over all batches is reported. The dict literal
is built inside the timed loop, as in a real training loop. "up": the real ``stagewatch serve`` in its own
process (benchmarks.harness), SQLite; "down": a loopback port where nothing listens, so the sender thread
retries and spills to a temporary spool directory while the loop runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from trainer import start_run

TARGET_US = 2.0


def measure(run: Any, calls: int, batch: int) -> dict[str, float]:
    per_call_ns: list[float] = []
    log = run.log
    step = 0
    for _ in range(calls // batch):
        started = time.perf_counter_ns()
        for _ in range(batch):
            log({"loss": 0.5, "lr": 0.1, "acc": 0.9}, step=step, epoch=step / 125)  # as stagewatch train does
            step += 1
        per_call_ns.append((time.perf_counter_ns() - started) / batch)
    return {
        "median_us": statistics.median(per_call_ns) / 1000,
        "p90_us": harness.percentile(per_call_ns, 90) / 1000,
        "p99_us": harness.percentile(per_call_ns, 99) / 1000,
        "max_batch_us": max(per_call_ns) / 1000,
        "calls": float(step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=harness.positive_int, default=1_000_000)
    parser.add_argument("--batch", type=harness.positive_int, default=1000)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-spool-") as spool:
        with (
            harness.sqlite_database() as db_url,
            harness.running_server(db_url) as url,
            start_run(url, name="bench-log-cost", spool_dir=Path(spool) / "up", close_timeout_s=600) as run,
        ):
            results["server up"] = measure(run, args.calls, args.batch)
            started = time.perf_counter()
            flushed = run.flush(timeout=600)
            results["server up"]["flush_s"] = time.perf_counter() - started
            results["server up"]["all_acknowledged"] = float(flushed)
        down = f"http://127.0.0.1:{harness.free_port()}"
        with start_run(down, spool_dir=Path(spool) / "down", close_timeout_s=0.1, timeout=1) as run:
            results["server down"] = measure(run, args.calls, args.batch)
    rows = [
        [label, r["median_us"], r["p90_us"], r["p99_us"], r["max_batch_us"], int(r["calls"])]
        for label, r in results.items()
    ]
    harness.print_table(
        f"run.log cost per call, 3 keys, batches of {args.batch}",
        ["case", "median us", "p90 us", "p99 us", "worst batch us", "calls"],
        rows,
    )
    met = [
        harness.target_line(f"median log() cost, {label}", r["median_us"], TARGET_US, "us", higher_is_better=False)
        for label, r in results.items()
    ]
    harness.write_json(
        "log_cost",
        {"target_median_us": TARGET_US, "target_met": all(met), "batch": args.batch, "results": results},
    )


if __name__ == "__main__":
    main()
