"""``stagewatch train``: train a reference recipe for real and stream it to a Stagewatch server.

```sh
stagewatch train --recipe mnist1d-cnn --schedule autodecay --mode approve --epochs 60 --server http://127.0.0.1:8765
stagewatch train --recipe resnet18 --data /data/cifar10 --schedule step --epochs 90 --device cuda
```

Recipes: ``mnist1d-cnn`` (MNIST-1D, generated offline by the ``mnist1d`` package, a small 1-D CNN; about a
second per epoch on one CPU core) and ``resnet18`` (torchvision's ResNet-18 on any ImageFolder, e.g. CIFAR-10
exported to folders; ``--fake-data N`` checks the pipeline without data). The loop, the logged keys and the
schedules are described in :mod:`trainer.loop`. Every run is created with the server-side AutoDecay detector
on ``epoch/train_loss``; ``--mode`` says what the server does with its decisions.

This module imports torch only when training, so the ``stagewatch`` command can list it without torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.errors import TrackerError

EXIT_USAGE = 2
RECIPES = ("mnist1d-cnn", "resnet18")
SCHEDULES = ("constant", "step", "plateau", "autodecay")
MODES = ("auto", "approve", "observe")
DEFAULT_SERVER = "http://127.0.0.1:8765"
# The recipe's AutoDecay on the held-out accuracy (it levels off when a stage ends, while the training loss keeps
# falling as the small CNN memorises its 4,000 samples) with the epoch preset: a stage has ended when its best
# 3-epoch mean accuracy stops improving, over the last half of the stage (4-8 epochs), beyond noise (or beyond 10%
# of the stage's pace); the stage after the decay, at a small LR, is judged on single epochs and a 3-epoch window,
# so its stop comes a few epochs after it settled. One decay, then stop: a second decay (max_decays=2) was tried and
# added no accuracy for its epochs (StepDecay's own second decay adds none either on these settings). Chosen with
# benchmarks/bench_tta_closed_loop.py and bench_time_to_accuracy.py on eight MNIST-1D settings, validated on
# held-out ones; the README has the commands and the tables. ``chance`` (1/K for an accuracy, ln K for a loss)
# lets it tell a collapse from the end of a stage.
DETECTOR_METRIC = "test/accuracy"
DETECTOR_PARAMS: dict[str, Any] = {"preset": "epoch", "max_decays": 1}
# Plain SGD: at LR 0.1 the MNIST-1D CNN is at the edge of divergence (test accuracy zig-zags between 30 % and
# 90 % at a constant LR and some runs collapse to chance); at 0.05 every one of 36 runs (16 seeds, widths 16-64,
# 5,000-10,000 samples, label noise up to 0.2) trained without a collapse, and StepDecay ends 3.6 points higher
# (97.0 % against 93.4 %, seeds 0-2). tests/test_recipe_stability.py checks it over 10 seeds.
DEFAULT_LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word such as preset=step
    return key, value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagewatch train",
        description="Train a reference recipe on this machine and stream its metrics to a Stagewatch server.",
    )
    # Not `choices=`: an unknown recipe gets a message that lists the known ones, and exit status 2.
    parser.add_argument("--recipe", required=True, help=f"what to train: {', '.join(RECIPES)}")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="constant LR; step: x0.1 at 50%% and 75%% of the epochs; plateau: torch's ReduceLROnPlateau "
        "(defaults) on the epoch's train loss; autodecay: the server's AutoDecay decides (default: constant)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="what the server does with its detector's decisions: apply at once (auto), wait for a person "
        "(approve), only draw them (observe). Default: auto with --schedule autodecay, else observe",
    )
    parser.add_argument("--epochs", type=_positive_int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and minibatch order")
    parser.add_argument("--batch-size", type=_non_negative_int, default=32, help="0 = full batch")
    parser.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help=f"starting LR (default {DEFAULT_LR:g})")
    parser.add_argument(
        "--num-samples", type=_positive_int, default=None, help="MNIST-1D samples, train + test (default 5000)"
    )
    parser.add_argument(
        "--auto-approve-after",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="approve mode: a proposal nobody decided on within this many seconds is approved",
    )
    parser.add_argument(
        "--detector-metric",
        default=DETECTOR_METRIC,
        metavar="KEY",
        help=f"the metric the server's AutoDecay watches (default {DETECTOR_METRIC}; an accuracy is maximised, "
        "anything else minimised)",
    )
    parser.add_argument(
        "--detector-param",
        action="append",
        default=[],
        metavar="K=V",
        type=_key_value,
        help="a parameter of the server's AutoDecay detector (repeatable), e.g. rho=0.3; see `stagewatch replay`",
    )
    parser.add_argument("--width", type=_positive_int, default=32, help="mnist1d-cnn: channels per layer")
    parser.add_argument(
        "--label-noise",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="mnist1d-cnn: replace this fraction of training labels by random ones (default 0)",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("STAGEWATCH_URL", DEFAULT_SERVER),
        metavar="URL",
        help=f"Stagewatch server (default: $STAGEWATCH_URL, else {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token", default=os.environ.get("STAGEWATCH_TOKEN"), help="worker token (default: $STAGEWATCH_TOKEN)"
    )
    parser.add_argument(
        "--sync-detection",
        action="store_true",
        help="after each epoch wait for the server's detection and its commands: decisions land at the same epoch "
        "on any machine (reproducible tests and benchmarks; costs a round trip per epoch)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save a stage checkpoint here before every decay or LR change the server sends, and report it to the "
        "server (GET /runs/{id}/checkpoints); an operator can then roll the run back to one",
    )
    parser.add_argument(
        "--name", default=None, help="run name (default: recipe, schedule, LR, seed and the start time)"
    )
    parser.add_argument("--project", default="default", help="project of the run (default: default)")
    vision = parser.add_argument_group("resnet18 recipe (needs the 'vision' extra: torchvision)")
    vision.add_argument(
        "--data", default=None, metavar="DIR", help="an ImageFolder root with train/ and val/ (or test/) folders"
    )
    vision.add_argument(
        "--fake-data", type=_positive_int, default=None, metavar="N",
        help="train on N random FakeData images instead (pipeline check only: nothing to learn)",
    )  # fmt: skip
    vision.add_argument("--image-size", type=_positive_int, default=32, help="side of the (square) input images")
    vision.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    vision.add_argument("--workers", type=_non_negative_int, default=2, help="DataLoader worker processes")
    return parser


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(message: str) -> int:
    sys.stderr.write(f"stagewatch train: {message}\n")
    return EXIT_USAGE


def detector_config(
    metric: str = "", params: Sequence[tuple[str, Any]] = (), num_classes: int | None = None
) -> dict[str, Any]:
    """The server-side detector of runs started here: AutoDecay on ``metric`` (default :data:`DETECTOR_METRIC`)
    with :data:`DETECTOR_PARAMS`, then ``params`` on top; ``mode`` follows the metric (``max`` for an
    accuracy). With ``num_classes`` known, ``chance`` is the metric's chance level (``1/K`` for an accuracy,
    ``ln K`` for a cross-entropy loss), so that a run back there is told apart as diverged. With another
    schedule it still runs, in observe mode by default, so its decisions are drawn for comparison."""
    metric = metric or DETECTOR_METRIC
    name = metric.rsplit("/", 1)[-1]
    mode = "max" if "acc" in name else "min"
    chance: dict[str, Any] = {}
    if num_classes is not None and num_classes >= 2:
        if mode == "max":
            chance = {"chance": 1.0 / num_classes}
        elif "loss" in name:
            chance = {"chance": math.log(num_classes)}
    return {
        "name": "autodecay",
        "metric": metric,
        "params": {**DETECTOR_PARAMS, "mode": mode, **chance, **dict(params)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recipe not in RECIPES:
        return _fail(f"unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}")
    if args.num_samples is not None and args.num_samples < 20:
        return _fail(f"--num-samples must be at least 20, got {args.num_samples}")
    if args.recipe == "resnet18" and (args.data is None) == (args.fake_data is None):
        return _fail("--recipe resnet18 needs exactly one of --data DIR and --fake-data N")
    if args.mode is None:
        args.mode = "auto" if args.schedule == "autodecay" else "observe"
    try:
        return _train(args)
    except (RecipeError, TrackerError) as exc:  # TrackerError: the server refused the run (token, parameters)
        return _fail(str(exc))


class RecipeError(Exception):
    """A recipe cannot start (missing extra, bad data folder): a one-line message, exit status 2."""


def default_run_name(args: argparse.Namespace, started: dt.datetime) -> str:
    """What the run is and when it started, to the second: two runs of one command get two names (a name from the
    settings alone was the same for every rerun, and the dashboard could not tell the runs apart)."""
    return f"{args.recipe} {args.schedule} lr={args.lr:g} seed={args.seed} {started:%m-%d %H:%M:%S}"


def _task(args: argparse.Namespace) -> Any:
    if args.recipe == "mnist1d-cnn":
        from trainer.recipes.mnist1d import load_data, make_task

        return make_task(
            load_data(num_samples=args.num_samples),
            batch_size=args.batch_size,
            seed=args.seed,
            channels=args.width,
            label_noise=args.label_noise,
        )
    try:
        from trainer.recipes import vision
    except ImportError as exc:  # torchvision missing
        raise RecipeError(f"--recipe resnet18 needs torchvision (pip install 'stagewatch[vision]'): {exc}") from exc
    try:
        return vision.make_task(
            data=args.data,
            fake_images=args.fake_data,
            image_size=args.image_size,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            workers=args.workers,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecipeError(f"--recipe resnet18: {exc}") from exc


def _train(args: argparse.Namespace) -> int:
    import torch

    from trainer.loop import fit, step_milestones
    from trainer.run import start_run

    task = _task(args)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    run_config: dict[str, Any] = {
        "recipe": args.recipe,
        "schedule": args.schedule,
        "milestones": step_milestones(args.epochs) if args.schedule == "step" else [],
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "seed": args.seed,
        "steps_per_epoch": task.steps_per_epoch,
        **task.description,
    }
    name = args.name or default_run_name(args, dt.datetime.now())
    with start_run(
        args.server,
        name=name,
        project=args.project,
        config=run_config,
        token=args.token,
        tags=[args.recipe, args.schedule],
        detector=detector_config(args.detector_metric, args.detector_param, task.description.get("num_classes")),
        mode=args.mode,
        auto_approve_after_s=args.auto_approve_after,
    ) as run:
        plan = f"{name}, {args.epochs} epochs, {task.steps_per_epoch} steps/epoch, mode {args.mode}"
        _out(f"stagewatch train: run {run.id} ({plan}) on {args.server}")
        result = fit(
            task,
            run,
            schedule=args.schedule,
            epochs=args.epochs,
            optimizer=optimizer,
            log=_out,
            sync_detection=args.sync_detection,
            checkpoint_dir=args.checkpoint_dir,
        )
    _out(
        f"stagewatch train: run {run.id} {'stopped' if result.stopped else 'finished'}: {result.epochs} epochs, "
        f"{result.steps} steps, test loss {result.test_loss:.4f}, test accuracy {result.test_accuracy:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
