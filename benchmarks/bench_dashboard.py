"""The dashboard in Chromium against a real server: time to the first chart of a 1,000,000-point run, and the
time from ingesting a point to that point being on screen.

    .venv/bin/python -m benchmarks.bench_dashboard [--points 1000000] [--repeats 5] [--samples 30] [--quick]

One ``stagewatch serve`` process on a fresh SQLite file (or ``--engine postgres``) holds one run: ``train/loss``
and ``lr`` at every step (``--points`` steps; the LR is x0.1 at 50 % and 75 %, so the run has three stages), and
``epoch/train_loss``, ``test/loss``, ``test/accuracy`` every 1,000 steps. Debian's Chromium, driven by
Playwright, then opens ``/ui/run.html?id=N``:

* first chart: from navigation start to ``performance.mark("first-chart")``, which the page sets once
  ``Plotly.react`` has drawn its first figure (every panel: the page draws them in one figure); the marks
  ``data-ready`` (the run's data in the page) and ``plotly-ready`` (plotly.js run) say where the time went.
  *Warm*: a browser profile on disk that has opened a run page before (two untimed loads), so plotly.js is in
  its HTTP cache and V8's code cache, as for anyone who opened one this week; then ``--repeats`` loads, each in
  a new tab. *Cold*: a new, empty profile each time (a first visit). Each load is checked: every panel drawn,
  ``train/loss`` downsampled to at most 2,000 points reaching the last step, three stage ribbons.
* new point: with the page open, one ``train/loss`` point is posted at a time (``--samples``, 0.25 s apart, as a
  live worker would); the latency runs from just before the POST to the frame after ``Plotly.react`` drew a
  figure holding that step (the page stamps it with ``Date.now()``; same machine, same clock).

Targets: first chart with a new profile (a first visit; median) <= 1.5 s; new point p99 <= 1 s. The warm figure
is reported too. A first visit's time is mostly plotly.js: the dashboard ships its 1.2 MB basic bundle (see
``web/__init__.py``), where the full 4.8 MB bundle took 1.0-1.6 s to the first chart on two shared cores.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, Playwright, ViewportSize, sync_playwright

from benchmarks import harness

NAME = "dashboard"
TARGET_FIRST_CHART_S = 1.5
TARGET_NEW_POINT_S = 1.0
CHROMIUM = os.environ.get("STAGEWATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT: ViewportSize = {"width": 1440, "height": 1000}
EPOCH_EVERY = 1000
LOAD_TIMEOUT_MS = 60_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=harness.ENGINES, default="sqlite", help="database (default sqlite)")
    parser.add_argument("--postgres-url", default=harness.POSTGRES_ADMIN, help="admin URL for --engine postgres")
    parser.add_argument("--points", type=harness.positive_int, default=1_000_000, help="steps of train/loss and lr")
    parser.add_argument("--ingest-batch", type=harness.positive_int, default=50_000, help="points per upload")
    parser.add_argument("--repeats", type=harness.positive_int, default=5, help="timed page loads, warm and cold")
    parser.add_argument("--samples", type=harness.positive_int, default=30, help="new-point latency samples")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between new points")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="100,000 points, 3 loads, 10 samples: a smoke test")
    return parser


# --- the run --------------------------------------------------------------------------------------------------


def lr_at(step: int, points: int) -> float:
    return 0.1 * (0.1 ** ((step >= points // 2) + (step >= points * 3 // 4)))


def loss_at(rng: random.Random, step: int, points: int) -> float:
    """Each stage falls from where the last one ended towards a lower floor: the shape of a StepDecay run."""
    starts = (0, points // 2, points * 3 // 4)
    levels = (2.1, 0.9, 0.5, 0.35)  # the start of stage 0, then the floor of each stage
    stage = sum(step >= s for s in starts) - 1
    start_level = levels[0] if stage == 0 else levels[stage]
    floor = levels[stage + 1]
    tau = points / (20 if stage == 0 else 60)
    return floor + (start_level - floor) * math.exp(-(step - starts[stage]) / tau) + rng.gauss(0.0, 0.04)


def bodies(points: int, batch: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    chunk: list[dict[str, Any]] = []
    for step in range(points):
        t = harness.BASE_TIME + step * harness.SECONDS_PER_STEP
        epoch = step / EPOCH_EVERY
        loss = loss_at(rng, step, points)
        chunk.append({"key": "train/loss", "step": step, "value": loss, "epoch": epoch, "time": t})
        chunk.append({"key": "lr", "step": step, "value": lr_at(step, points), "epoch": epoch, "time": t})
        if step % EPOCH_EVERY == EPOCH_EVERY - 1:
            for key, value in (("epoch/train_loss", loss), ("test/loss", loss * 1.15), ("test/accuracy", 1 - loss / 3)):
                chunk.append({"key": key, "step": step, "value": value, "epoch": epoch, "time": t})
        if len(chunk) >= batch:
            yield harness.encode(chunk)
            chunk = []
    if chunk:
        yield harness.encode(chunk)


def load_run(client: httpx.Client, points: int, batch: int, seed: int) -> tuple[int, float]:
    response = client.post("/api/v1/runs", json={"name": "long-run", "project": "bench"})
    harness.check_status(response, 201)
    run_id: int = response.json()["id"]
    started = time.perf_counter()
    for body in bodies(points, batch, seed):
        harness.check_status(harness.post_points(client, run_id, body))
    seconds = time.perf_counter() - started
    # Stages follow the logged LR; live detection reads all of it once, in its own thread.
    deadline = time.monotonic() + 600
    while True:
        stages = client.get(f"/api/v1/runs/{run_id}/stages").json()
        if len(stages) == 3 and stages[-1]["summary"] is not None and stages[1]["end_step"] is not None:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not find the three stages: {stages}")
        time.sleep(0.5)
    return run_id, seconds


# --- the browser ------------------------------------------------------------------------------------------------


MARKS = ("data-ready", "plotly-ready", "first-chart")  # performance marks of web/run.js, in this order


def open_run_page(page: Page, base_url: str, run_id: int, points: int) -> dict[str, float]:
    """Loads the run page; returns its marks (s from navigation start: data in, plotly.js run, first chart drawn)
    after checking the chart."""
    page.goto(f"{base_url}/ui/run.html?id={run_id}")
    page.wait_for_function(
        "() => window.__stagewatch && window.__stagewatch.firstChart != null", timeout=LOAD_TIMEOUT_MS, polling=20
    )
    marks: dict[str, float] = page.evaluate(
        "(names) => Object.fromEntries(names.map((n) => [n, performance.getEntriesByName(n)[0].startTime / 1000]))",
        list(MARKS),
    )
    check: dict[str, Any] = page.evaluate(
        """() => {
          const gd = document.getElementById('chart');
          const raw = gd.data.filter((t) => t.meta && t.meta.role === 'raw');
          const loss = raw.find((t) => t.meta.key === 'train/loss');
          return {
            keys: raw.map((t) => t.meta.key).sort(),
            lossPoints: loss ? loss.x.length : 0,
            lossLast: loss ? loss.x[loss.x.length - 1] : null,
            ribbons: gd.layout.shapes.filter((s) => s.label && s.label.text).length,
          };
        }"""
    )
    wanted = sorted(["epoch/train_loss", "lr", "test/accuracy", "test/loss", "train/loss"])
    if check["keys"] != wanted or not 0 < check["lossPoints"] <= 2000 or check["lossLast"] != points - 1:
        raise RuntimeError(f"the chart is not what it should be: {check}")
    if check["ribbons"] != 3:
        raise RuntimeError(f"expected 3 stage ribbons, found {check['ribbons']}")
    return marks


def first_chart(
    playwright: Playwright, browser: Browser, base_url: str, run_id: int, points: int, repeats: int
) -> dict[str, list[dict[str, float]]]:
    warm: list[dict[str, float]] = []
    cold: list[dict[str, float]] = []
    # Warm: a browser profile on disk, as a person's browser is. Its HTTP cache keeps plotly.js and, from the
    # script's second run on, V8's compiled code for it (incognito contexts keep neither across tabs).
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport=VIEWPORT
        )
        try:
            for _ in range(2):  # untimed: into the cache, and the run that makes the code cache
                page = context.new_page()
                open_run_page(page, base_url, run_id, points)
                page.close()
            for i in range(repeats):
                page = context.new_page()
                warm.append(open_run_page(page, base_url, run_id, points))
                page.close()
                print(f"  warm load {i + 1}/{repeats}: {describe(warm[-1])}", flush=True)
        finally:
            context.close()
    for i in range(repeats):
        fresh = browser.new_context(viewport=VIEWPORT)  # a new, empty profile: a first visit
        try:
            cold.append(open_run_page(fresh.new_page(), base_url, run_id, points))
        finally:
            fresh.close()
        print(f"  cold load {i + 1}/{repeats}: {describe(cold[-1])}", flush=True)
    return {"warm": warm, "cold": cold}


def describe(marks: dict[str, float]) -> str:
    return ", ".join(f"{name} {marks[name] * 1e3:.0f} ms" for name in MARKS)


def new_point_latency(
    browser: Browser, client: httpx.Client, base_url: str, run_id: int, points: int, samples: int, interval: float
) -> dict[str, list[float]]:
    context = browser.new_context(viewport=VIEWPORT)
    latency: list[float] = []
    ingest: list[float] = []
    try:
        page = context.new_page()
        open_run_page(page, base_url, run_id, points)
        page.wait_for_function(
            "() => document.getElementById('live-state').dataset.state === 'live'", timeout=LOAD_TIMEOUT_MS
        )
        rng = random.Random(7)
        for i in range(samples):
            step = points + i
            value = loss_at(rng, points - 1, points)
            body = harness.encode([{"key": "train/loss", "step": step, "value": value, "epoch": step / EPOCH_EVERY}])
            sent = time.time()
            harness.check_status(harness.post_points(client, run_id, body))
            answered = time.time()
            page.wait_for_function(
                "(step) => (window.__stagewatch.lastDrawn['train/loss'] ?? -1) >= step",
                arg=step,
                timeout=LOAD_TIMEOUT_MS,
                polling=10,
            )
            drawn_ms: float = page.evaluate("window.__stagewatch.drawnAt")
            latency.append(drawn_ms / 1000 - sent)
            ingest.append(answered - sent)
            time.sleep(interval)
    finally:
        context.close()
    return {"latency": latency, "ingest": ingest}


def stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p99": harness.percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.points, args.repeats, args.samples = 100_000, 3, 10
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set STAGEWATCH_CHROMIUM)")
    harness.snapshot_code()
    env = harness.server_env_for_batch(args.ingest_batch)
    with (
        harness.database(args.engine, args.postgres_url) as db_url,
        harness.running_server(db_url, env=env) as url,
        harness.http_client(url) as client,
    ):
        print(f"[dashboard] {args.engine}: loading {args.points:,} steps of train/loss and lr ...", flush=True)
        run_id, load_s = load_run(client, args.points, args.ingest_batch, args.seed)
        total = client.get(f"/api/v1/runs/{run_id}").json()["latest"]
        stored = sum(v["count"] for v in total.values())
        print(f"  {stored:,} points stored in {load_s:.1f} s", flush=True)
        harness.analyze(args.engine, db_url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                print("[dashboard] first chart ...", flush=True)
                loads = first_chart(playwright, browser, url, run_id, args.points, args.repeats)
                print(f"[dashboard] new points, {args.samples} samples ...", flush=True)
                live = new_point_latency(browser, client, url, run_id, args.points, args.samples, args.interval)
            finally:
                browser.close()
    warm, cold = stats([m["first-chart"] for m in loads["warm"]]), stats([m["first-chart"] for m in loads["cold"]])
    phases = {
        profile: {name: statistics.median(m[name] for m in loads[profile]) for name in MARKS}
        for profile in ("warm", "cold")
    }
    latency, ingest = stats(live["latency"]), stats(live["ingest"])
    rows = [
        ["first chart, browser profile warm (s)", warm["median"], warm["min"], warm["max"], "-", warm["n"]],
        ["first chart, new profile (s)", cold["median"], cold["min"], cold["max"], "-", cold["n"]],
        ["new point on screen after ingest (s)", latency["median"], latency["min"], latency["max"], latency["p99"],
         latency["n"]],
        ["  of which the ingest request (s)", ingest["median"], ingest["min"], ingest["max"], ingest["p99"],
         ingest["n"]],
    ]  # fmt: skip
    harness.print_table(
        f"Dashboard, {stored:,} points ({args.points:,} steps), {args.engine}, Chromium",
        ["measure", "median", "min", "max", "p99", "n"],
        [[r[0], *(f"{v:.3f}" if isinstance(v, float) else v for v in r[1:])] for r in rows],
    )
    harness.print_table(
        "First chart, where the time goes (median seconds from navigation start)",
        ["profile", "data in the page", "plotly.js run", "first chart drawn"],
        [[p, *(f"{phases[p][name]:.3f}" for name in MARKS)] for p in ("warm", "cold")],
    )
    # The target is a first visit's (issue 15: "with a fresh browser profile"); the warm figure is reported.
    targets = {
        "first_chart_new_profile_median_s": {
            "target": TARGET_FIRST_CHART_S,
            "value": cold["median"],
            "unit": "s",
            "met": harness.target_line(
                "first chart (median, new browser profile)",
                cold["median"] * 1e3,
                TARGET_FIRST_CHART_S * 1e3,
                "ms",
                higher_is_better=False,
            ),
        },
        "new_point_p99_s": {
            "target": TARGET_NEW_POINT_S,
            "value": latency["p99"],
            "unit": "s",
            "met": harness.target_line(
                "new point on screen (p99)",
                latency["p99"] * 1e3,
                TARGET_NEW_POINT_S * 1e3,
                "ms",
                higher_is_better=False,
            ),
        },
    }
    harness.target_line(
        "first chart (median, warm profile; reported)",
        warm["median"] * 1e3,
        TARGET_FIRST_CHART_S * 1e3,
        "ms",
        higher_is_better=False,
    )
    results = {
        "points_stored": stored,
        "ingest_s": load_s,
        "first_chart_s": {
            "warm": loads["warm"],
            "cold": loads["cold"],
            "warm_stats": warm,
            "cold_stats": cold,
            "median_marks": phases,
        },
        "new_point_s": {**live, "latency_stats": latency, "ingest_stats": ingest},
        "browser": CHROMIUM,
    }
    harness.write_json(NAME, {"options": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
