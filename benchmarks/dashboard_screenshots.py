"""The README's dashboard screenshots, from real training runs.

    .venv/bin/python -m benchmarks.dashboard_screenshots [--out docs/screenshots] [--epochs 60] [--seed 2]

Starts ``stagewatch serve`` on a fresh SQLite file and two real MNIST-1D workers (``stagewatch train``, 1-D CNN,
SGD 0.1, batch 32): AutoDecay in approve mode, and StepDecay (x0.1 at 50 % and 75 % of the epochs), plus a
ReduceLROnPlateau run and a short constant-LR one for the runs page. The first
proposal of the AutoDecay run is approved through the API, as an operator would; when the second one is waiting,
Chromium takes the runs page and that run's page (light, and dark as under a dark system theme); once StepDecay
has made both its decays, the compare page of the two. Takes two to three minutes on two cores. Needs torch and
mnist1d (``pip install '.[train]'``).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, ViewportSize, sync_playwright

from benchmarks import harness
from benchmarks.bench_dashboard import CHROMIUM, CHROMIUM_ARGS

DEFAULT_OUT = harness.REPO_ROOT / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1440, "height": 1000}
TIMEOUT_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dashboard_screenshots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNGs go (default docs/screenshots)")
    parser.add_argument("--epochs", type=harness.positive_int, default=60)
    parser.add_argument("--seed", type=int, default=2)
    return parser


def train(base_url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [str(harness.stagewatch_script()), "train", "--recipe", "mnist1d-cnn", "--batch-size", "32",
               "--lr", "0.1", "--project", "mnist1d", "--server", base_url, *args]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_for(what: str, condition: Callable[[], Any], workers: Sequence[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        if all(w.poll() is not None for w in workers):
            raise RuntimeError(f"the workers ended before {what}")
        time.sleep(0.5)


def run_named(client: httpx.Client, name: str) -> dict[str, Any] | None:
    runs: list[dict[str, Any]] = client.get("/api/v1/runs", params={"name": name}).json()["data"]
    return next((r for r in runs if r["name"] == name), None)


def proposals(client: httpx.Client, run_id: int) -> list[dict[str, Any]]:
    decisions: list[dict[str, Any]] = client.get(f"/api/v1/runs/{run_id}/decisions").json()
    return [d for d in decisions if d["status"] == "proposed"]


def screenshot(page: Page, url: str, path: Path, *, full_page: bool) -> None:
    page.goto(url)
    page.wait_for_function(
        # A function, not a bare expression: Playwright polls an expression with eval, which the CSP refuses.
        "() => window.__stagewatch && (window.__stagewatch.firstChart != null || window.__stagewatch.loadedAt != null)"
    )
    page.wait_for_timeout(1500)  # the stage lookups of the runs page, hover-free charts
    page.screenshot(path=str(path), full_page=full_page)
    print(f"wrote {path.relative_to(harness.REPO_ROOT) if path.is_relative_to(harness.REPO_ROOT) else path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    epochs = str(args.epochs)
    seed = str(args.seed)
    with (
        harness.sqlite_database() as db_url,
        harness.running_server(db_url) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
        tempfile.TemporaryDirectory(prefix="stagewatch-shots-") as logs,
    ):
        auto = train(base_url, Path(logs) / "auto.log", "--schedule", "autodecay", "--mode", "approve",
                     "--epochs", epochs, "--seed", seed, "--name", "autodecay-approve",
                     "--detector-param", "max_decays=3")  # fmt: skip
        step = train(base_url, Path(logs) / "step.log", "--schedule", "step", "--epochs", epochs, "--seed", seed,
                     "--name", "stepdecay")  # fmt: skip
        # Two more for the runs page: ReduceLROnPlateau, and a short constant-LR run that is finished by then.
        plateau = train(base_url, Path(logs) / "plateau.log", "--schedule", "plateau", "--epochs", "40",
                        "--seed", str(args.seed + 1), "--name", "plateau")  # fmt: skip
        short = train(base_url, Path(logs) / "constant.log", "--schedule", "constant", "--epochs", "3",
                      "--seed", str(args.seed + 2), "--name", "constant-lr-smoke")  # fmt: skip
        workers = [auto, step, plateau, short]
        try:
            auto_run = wait_for("the AutoDecay run", lambda: run_named(client, "autodecay-approve"), workers)
            step_run = wait_for("the StepDecay run", lambda: run_named(client, "stepdecay"), workers)
            first = wait_for("a first proposal", lambda: proposals(client, auto_run["id"]), workers)[0]
            response = client.post(
                f"/api/v1/runs/{auto_run['id']}/decisions/{first['id']}/approve",
                json={"reason": "train loss flat for 5 epochs, agreed"},
            )
            harness.check_status(response)
            second = wait_for("a second proposal", lambda: proposals(client, auto_run["id"]), workers)[0]
            print(f"run {auto_run['id']}: proposal {second['id']} ({second['action']}) is waiting", flush=True)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": VIEWPORT["width"], "height": 520})
                screenshot(page, f"{base_url}/ui/", args.out / "runs.png", full_page=True)
                page.set_viewport_size(VIEWPORT)
                run_url = f"{base_url}/ui/run.html?id={auto_run['id']}"
                screenshot(page, run_url, args.out / "run.png", full_page=True)
                # The same page under a dark system theme (prefers-color-scheme), as the page follows it.
                dark = browser.new_page(viewport=VIEWPORT, color_scheme="dark")
                screenshot(dark, run_url, args.out / "run-dark.png", full_page=False)
                dark.close()
                # The waiting proposal decided, StepDecay past both its decays: the two schedules side by side.
                client.post(f"/api/v1/runs/{auto_run['id']}/decisions/{second['id']}/approve", json={})
                wait_for(
                    "StepDecay's second decay",
                    lambda: len(client.get(f"/api/v1/runs/{step_run['id']}/stages").json()) >= 3,
                    workers,
                )
                auto.wait(timeout=TIMEOUT_S)
                ids = f"{auto_run['id']},{step_run['id']}"
                screenshot(page, f"{base_url}/ui/compare.html?runs={ids}", args.out / "compare.png", full_page=True)
                browser.close()
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                    worker.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
