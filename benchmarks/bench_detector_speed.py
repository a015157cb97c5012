"""Per-point cost of every registered stage detector, fed in-process one point at a time (no server).

    .venv/bin/python -m benchmarks.bench_detector_speed [--points 200000] [--repeats 3] [--target-us 10]

Loss detectors get a realistic per-step training loss: 4 stages (the LR is cut at fixed steps, as StepDecay
does), each falling fast and then flattening, Gaussian noise, rare spikes and two NaNs. The ``stationarity``
detector gets what a worker sends it: Delta_k = <x_{k+1}, d_k> + (lr/2)||d_k||^2 of SGD with dampened momentum
on a noisy 20-D quadratic under the same step schedule. The series do not react to the decisions; parameters
that would end detection early (``max_decays``, ``min_lr``) are relaxed so every point is measured with the
detector active. Each detector runs ``--repeats`` times on a fresh instance; the table shows the median.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import harness
from server.detectors import DETECTORS, make_detector

STAGES = 4
SEED = 1234


def loss_series(points: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    steps = np.arange(points)
    stage_len = max(1, points // STAGES)
    stage = np.minimum(steps // stage_len, STAGES - 1)
    t = steps - stage * stage_len
    floor = 0.3 * 0.6**stage
    scale = 0.5**stage
    loss = floor + 2.0 * scale * np.exp(-t / (stage_len / 8)) + rng.normal(0, 0.05, points) * scale
    spikes = rng.random(points) < 1 / 5000
    loss[spikes] *= 5.0
    values: list[float] = loss.tolist()
    for at in (points // 3, 2 * points // 3):
        values[at] = math.nan
    return values


def delta_series(points: int, seed: int, dim: int = 20) -> list[float]:
    """The SASA+ statistic of SGD with dampened momentum (beta 0.9) on 0.5 x'Ax + noise, LR 0.5 cut x0.1
    at the stage boundaries."""
    rng = np.random.default_rng(seed)
    curvature = np.linspace(0.1, 1.0, dim)
    noise = rng.normal(0, 1, (points, dim))
    x = rng.normal(0, 3, dim)
    h = np.zeros(dim)
    stage_len = max(1, points // STAGES)
    out = np.empty(points)
    for k in range(points):
        alpha = 0.5 * 0.1 ** min(k // stage_len, STAGES - 1)
        g = curvature * x + noise[k]
        h = 0.1 * g + 0.9 * h
        x = x - alpha * h
        out[k] = x @ h + 0.5 * alpha * (h @ h)
    values: list[float] = out.tolist()
    return values


def params_for(name: str) -> dict[str, Any]:
    fields = DETECTORS[name].Params.model_fields
    params: dict[str, Any] = {}
    if "max_decays" in fields:
        params["max_decays"] = 1_000_000
    if "min_lr" in fields:
        params["min_lr"] = 0.0
    return params


def time_detector(name: str, params: dict[str, Any], values: list[float]) -> tuple[float, int, list[str]]:
    detector = make_detector(name, params)
    update = detector.update
    decisions = []
    started = time.perf_counter()
    for step, value in enumerate(values):
        out = update(step, value)
        if out:
            decisions.extend(out)
    elapsed = time.perf_counter() - started
    return elapsed, len(decisions), sorted({d.action for d in decisions})


def time_noop(values: list[float]) -> float:
    """The loop and one Python call per point, doing nothing: the floor under every row."""

    def update(_step: int, _value: float) -> list[Any]:
        return []

    started = time.perf_counter()
    for step, value in enumerate(values):
        out = update(step, value)
        if out:
            pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_detector_speed", description=__doc__)
    parser.add_argument("--points", type=harness.positive_int, default=200_000, help="points per run")
    parser.add_argument("--repeats", type=harness.positive_int, default=3, help="runs per detector (median)")
    parser.add_argument("--target-us", type=float, default=10.0, help="target per-point cost in microseconds")
    args = parser.parse_args(argv)
    harness.snapshot_code()

    make_detector("plateau")  # loads every built-in detector
    names = sorted(DETECTORS)
    loss = loss_series(args.points, SEED)
    delta = delta_series(args.points, SEED) if "stationarity" in names else []

    rows: list[list[object]] = []
    results: dict[str, Any] = {}
    noop = statistics.median(time_noop(loss) for _ in range(args.repeats))
    all_met = True
    for name in names:
        values = delta if name == "stationarity" else loss
        params = params_for(name)
        runs = [time_detector(name, params, values) for _ in range(args.repeats)]
        seconds = [r[0] for r in runs]
        median = statistics.median(seconds)
        us = median / args.points * 1e6
        met = us <= args.target_us
        all_met &= met
        decisions, actions = runs[0][1], runs[0][2]
        rows.append([name, us, args.points / median, min(seconds) / args.points * 1e6, decisions, met])
        results[name] = {
            "series": "delta" if name == "stationarity" else "loss",
            "params": params,
            "seconds": seconds,
            "us_per_point_median": us,
            "points_per_s": args.points / median,
            "decisions": decisions,
            "actions": actions,
            "target_met": met,
        }
    noop_us = noop / args.points * 1e6
    rows.append(["(no-op call, floor)", noop_us, args.points / noop, noop_us, 0, True])

    harness.print_table(
        f"Detector update cost, {args.points:,} points, median of {args.repeats}",
        ["detector", "us/point", "points/s", "best us/point", "decisions", f"<= {args.target_us:g} us"],
        rows,
    )
    for name in names:
        harness.target_line(
            f"{name} per-point cost", results[name]["us_per_point_median"], args.target_us, "us",
            higher_is_better=False,
        )  # fmt: skip
    harness.write_json(
        "detector_speed",
        {
            "points": args.points,
            "repeats": args.repeats,
            "target_us_per_point": args.target_us,
            "noop_us_per_point": noop_us,
            "detectors": results,
            "all_targets_met": all_met,
        },
    )
    return 0 if all_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
