"""The ceiling of issue 11's time-to-accuracy goal: what *any* first-decay epoch reaches within half the budget.

The goal asks AutoDecay for StepDecay's mean final accuracy (x0.1 at epochs 30 and 45 of 60) in at most half
its epochs. A run that must end by epoch 30 with one x0.1 decay is fully described by the epoch ``e`` of that
decay, so this trains, per setting and seed, the constant-LR trunk and a branch decayed at each ``e`` in
``--decay-epochs``, and reports for each ``e`` the mean accuracy at epoch 30 (the budget's end) and the mean of
each branch's best epoch up to 30 (an oracle that also picks the stop), both as a gap to StepDecay's. A
detector can only do as well as the best column: where every column is below zero, the goal cannot be met on
that setting by deciding *when* to decay, whatever the rule.

Same training as :mod:`benchmarks.bench_tta_closed_loop` (the recipe's task, one thread, its memoised
trajectory tree: the decision applies at an epoch boundary).

    .venv/bin/python -m benchmarks.bench_tta_ceiling --settings held-out --out held-out
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.bench_tta_closed_loop import EPOCHS, HELD_OUT, TUNE, Setting, Tree, run_step
from benchmarks.harness import write_json
from trainer.recipes.mnist1d import load_data

BUDGET = EPOCHS // 2  # issue 11: at most 0.5x StepDecay's epochs


def measure(setting: Setting, decay_epochs: Sequence[int]) -> dict[str, Any]:
    data = load_data(num_samples=setting.num_samples)
    seeds: list[dict[str, Any]] = []
    for seed in setting.seeds:
        tree = Tree(setting, seed, data)
        step = run_step(tree)
        branches = {e: [tree.accuracy((e,), k) for k in range(e + 1, BUDGET + 1)] for e in decay_epochs}
        seeds.append({"seed": seed, "step_final": step.final, "trunk": step.curve[:BUDGET], "branches": branches})
    step_mean = statistics.fmean(s["step_final"] for s in seeds)
    columns = {
        e: {
            "gap_at_budget": 100 * (statistics.fmean(s["branches"][e][-1] for s in seeds) - step_mean),
            "gap_best": 100 * (statistics.fmean(max(s["branches"][e]) for s in seeds) - step_mean),
        }
        for e in decay_epochs
    }
    return {"step_accuracy": 100 * step_mean, "columns": columns, "seeds": seeds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tta_ceiling", description=__doc__)
    parser.add_argument("--settings", default="held-out", choices=("held-out", "tune", "all"))
    parser.add_argument("--decay-epochs", default="14,18,22,24,26", help="first-decay epochs to try (< 30)")
    parser.add_argument("--out", default=None, metavar="NAME", help="write benchmarks/results/tta_ceiling-NAME.json")
    args = parser.parse_args(argv)
    decay_epochs = [int(e) for e in args.decay_epochs.split(",")]
    if not all(0 < e < BUDGET for e in decay_epochs):
        parser.error(f"decay epochs must be within 1..{BUDGET - 1}")
    settings = {"held-out": HELD_OUT, "tune": TUNE, "all": TUNE + HELD_OUT}[args.settings]
    header = f"{'setting':<34} {'StepDecay':>9}" + "".join(f" {f'e={e} @{BUDGET} / best':>17}" for e in decay_epochs)
    print(f"gap to StepDecay's mean final accuracy, points; mean of {len(settings[0].seeds)} seeds\n{header}")
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for setting in settings:
        row = measure(setting, decay_epochs)
        results[setting.name] = row
        cells = "".join(
            f" {c['gap_at_budget']:+8.2f} / {c['gap_best']:+5.2f}" for c in (row["columns"][e] for e in decay_epochs)
        )
        reachable = any(c["gap_at_budget"] >= 0 for c in row["columns"].values())
        print(
            f"{setting.name:<34} {row['step_accuracy']:8.2f}%{cells}  {'reachable' if reachable else 'NOT reachable'}"
        )
    wall = time.perf_counter() - started
    print(f"({wall:.0f} s)")
    if args.out:
        write_json(f"tta_ceiling-{args.out}", {"decay_epochs": decay_epochs, "wall_s": wall, "settings": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
