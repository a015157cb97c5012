"""Record real training curves with the MNIST-1D recipe, for the detection benchmark.

The runs go through :func:`trainer.loop.fit`, the loop ``stagewatch train`` runs (with the recipe's
:func:`trainer.recipes.mnist1d.make_task`), without a server: what is recorded comes from its ``on_step`` and
``on_epoch`` hooks and from SGD's step hooks (:mod:`benchmarks.sasa`).

Two schedules, several seeds each (training seed = model init and minibatch order; the dataset is the same):

* ``constant``: one LR for the whole budget. The training loss falls, then hovers at the level the SGD noise
  of that LR allows: a plateau whose onset is the ground truth of ``bench_detection``.
* ``stepdecay``: the same LR, x0.1 at 50% and at 75% of the epochs (``LR x 0.1 at fixed epochs`` of the
  paper). The curves split into stages with a sharp drop at each decay.

Each run writes two CSV files to ``benchmarks/data/curves/`` (committed; the detection benchmark reads them):

* ``<schedule>-seed<k>-step.csv``: ``step, lr, train_loss, sasa_delta``, one row per optimizer update
  (``train_loss`` is the minibatch loss before the update; ``sasa_delta`` is SASA+'s stationarity statistic
  ``<x_{k+1}, d_k> + (lr/2)||d_k||^2`` with ``d_k`` the momentum buffer after the step, which the
  ``stationarity`` detector consumes instead of a loss; see :mod:`benchmarks.sasa`);
* ``<schedule>-seed<k>-epoch.csv``: ``step, epoch, lr, train_loss, train_acc, test_loss, test_acc``, one row
  per epoch; ``step`` is the global step at the end of the epoch, ``train_*`` average the epoch's minibatches.

plus ``manifest.json`` (the recipe settings and each run's final numbers; no timings, so it is reproducible).
Wall times go to ``benchmarks/results/record_curves.json`` (git-ignored). Runs are deterministic: the same
settings give the same files on the same machine. Run from the repository root::

    .venv/bin/python -m benchmarks.record_curves [--epochs 100] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO_ROOT, positive_int, print_table, write_json

CURVES_DIR = Path(__file__).resolve().parent / "data" / "curves"
SCHEDULES = ("constant", "stepdecay")
FIT_SCHEDULES = {"constant": "constant", "stepdecay": "step"}  # file names keep the paper's word
STEP_COLUMNS = ("step", "lr", "train_loss", "sasa_delta")
EPOCH_COLUMNS = ("step", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


@dataclass(frozen=True)
class RunSpec:
    schedule: str
    seed: int
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    num_samples: int | None

    @property
    def name(self) -> str:
        return f"{self.schedule}-seed{self.seed}"

    def milestones(self) -> list[int]:
        """0-based epochs at which StepDecay multiplies the LR by 0.1: 50% and 75% of the budget."""
        from trainer.loop import step_milestones  # imports torch: in the worker processes only

        return step_milestones(self.epochs) if self.schedule == "stepdecay" else []


@dataclass(frozen=True)
class RunOutput:
    spec: RunSpec
    step_rows: list[tuple[int, float, float, float]]
    epoch_rows: list[tuple[int, int, float, float, float, float, float]]
    seconds: float
    seconds_per_epoch: float
    num_train: int
    num_test: int


def run_one(spec: RunSpec) -> RunOutput:
    """Trains one run (in a worker process: torch is imported here only) and returns its rows."""
    import torch

    from benchmarks.offline_run import OfflineRun
    from benchmarks.sasa import SasaDelta
    from trainer.loop import EpochStats, StepStats, fit
    from trainer.recipes import mnist1d

    data = mnist1d.load_data(spec.num_samples)
    task = mnist1d.make_task(data, batch_size=spec.batch_size, seed=spec.seed)
    optimizer = torch.optim.SGD(
        task.model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    sasa = SasaDelta(optimizer)
    step_rows: list[tuple[int, float, float, float]] = []
    epoch_rows: list[tuple[int, int, float, float, float, float, float]] = []
    epoch_seconds: list[float] = []
    correct = 0  # training accuracy of the epoch so far: fit logs only the loss

    def on_step(s: StepStats) -> None:
        nonlocal correct
        correct += int((s.outputs.detach().argmax(dim=1) == s.labels).sum().item())
        step_rows.append((s.step, s.lr, s.loss, sasa.value))

    def on_epoch(e: EpochStats) -> None:
        nonlocal correct
        train_acc = correct / data.num_train
        correct = 0
        epoch_rows.append((e.step, e.epoch, e.lr, e.train_loss, train_acc, e.test_loss, e.test_accuracy))
        epoch_seconds.append(e.seconds)

    result = fit(
        task,
        OfflineRun(),
        schedule=FIT_SCHEDULES[spec.schedule],
        epochs=spec.epochs,
        optimizer=optimizer,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    per_epoch = sum(epoch_seconds) / len(epoch_seconds)
    num_test = int(data.y_test.shape[0])
    return RunOutput(spec, step_rows, epoch_rows, result.seconds, per_epoch, data.num_train, num_test)


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def write_csv(path: Path, columns: tuple[str, ...], rows: list[Any]) -> int:
    lines = [",".join(columns)]
    lines.extend(",".join(_fmt(v) for v in row) for row in rows)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return len(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=100, help="epochs per run (default 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="minibatch size, 0 = full batch (default 32)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")
    parser.add_argument("--num-samples", type=int, default=None, help="MNIST-1D samples, train+test (default 5000)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="training seeds 0..N-1 per schedule (default 3)")
    parser.add_argument(
        "--schedules", default=",".join(SCHEDULES), help=f"comma-separated subset of {','.join(SCHEDULES)}"
    )
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs in parallel, one core each (default 2)")
    parser.add_argument("--out", type=Path, default=CURVES_DIR, help="output folder (default benchmarks/data/curves)")
    args = parser.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not schedules or any(s not in SCHEDULES for s in schedules):
        parser.error(f"--schedules must be a comma-separated subset of {','.join(SCHEDULES)}")
    if args.batch_size < 0:
        parser.error("--batch-size must be >= 0")

    specs = [
        RunSpec(s, seed, args.epochs, args.lr, args.batch_size, args.momentum, args.weight_decay, args.num_samples)
        for s in schedules
        for seed in range(args.seeds)
    ]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"recording {len(specs)} runs ({args.epochs} epochs each) with {args.jobs} parallel jobs ...", flush=True)
    # spawn: a fresh interpreter per worker, so no torch thread pool is inherited across a fork.
    with multiprocessing.get_context("spawn").Pool(processes=min(args.jobs, len(specs))) as pool:
        outputs = pool.map(run_one, specs, chunksize=1)
    wall = time.perf_counter() - started

    total_bytes = 0
    manifest_runs: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    for o in outputs:
        name = o.spec.name
        total_bytes += write_csv(out / f"{name}-step.csv", STEP_COLUMNS, o.step_rows)
        total_bytes += write_csv(out / f"{name}-epoch.csv", EPOCH_COLUMNS, o.epoch_rows)
        last = o.epoch_rows[-1]
        stage_acc = _stage_end_test_acc(o)
        manifest_runs.append({
            "name": name,
            "spec": asdict(o.spec),
            "milestones": o.spec.milestones(),
            "steps": last[0],
            "final_train_loss": last[3],
            "final_test_loss": last[5],
            "final_test_acc": last[6],
            "best_test_acc": max(r[6] for r in o.epoch_rows),
            "test_acc_at_stage_ends": stage_acc,
        })  # fmt: skip
        rows.append([
            name, o.spec.epochs, last[0], last[3], last[5], f"{last[6]:.3f}", f"{max(r[6] for r in o.epoch_rows):.3f}",
            " / ".join(f"{a:.3f}" for a in stage_acc), round(o.seconds, 1), round(o.seconds_per_epoch, 2),
        ])  # fmt: skip
    manifest = {
        "recipe": "trainer.recipes.mnist1d",
        "dataset": {
            "generator": "mnist1d.data.make_dataset(get_dataset_args())",
            "num_samples": args.num_samples,
            "train": outputs[0].num_train,
            "test": outputs[0].num_test,
        },
        "runs": manifest_runs,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total_bytes += (out / "manifest.json").stat().st_size

    print_table(
        "Recorded runs (MNIST-1D ConvNet, SGD momentum 0.9, wd 5e-4)",
        [
            "run", "epochs", "steps", "final train loss", "final test loss", "final test acc", "best test acc",
            "test acc at stage ends", "time s", "s/epoch",
        ],
        rows,
    )  # fmt: skip
    where = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
    print(f"\n{len(outputs) * 2} CSV files, {total_bytes / 1e6:.2f} MB in {where}; wall time {wall:.0f} s")
    write_json(
        "record_curves",
        {
            "settings": vars(args) | {"out": str(where)},
            "wall_seconds": wall,
            "bytes_written": total_bytes,
            "runs": [
                {"name": o.spec.name, "seconds": o.seconds, "seconds_per_epoch": o.seconds_per_epoch} for o in outputs
            ],
        },
    )


def _stage_end_test_acc(o: RunOutput) -> list[float]:
    """Test accuracy at the last epoch of each LR level (one value for a constant LR)."""
    ends = [*o.spec.milestones(), o.spec.epochs]
    return [o.epoch_rows[e - 1][6] for e in ends]


if __name__ == "__main__":
    main()
