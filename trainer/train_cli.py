"""``stagewatch train``: train a reference recipe for real and stream it to a Stagewatch server.

```sh
stagewatch train --recipe mnist1d-cnn --schedule step --epochs 30 --server http://127.0.0.1:8765
```

Per step it logs ``train/loss`` (the minibatch loss before the update) and ``lr`` (the rate the update used);
per epoch ``epoch/train_loss``, ``test/loss`` and ``test/accuracy``. After every update a
:class:`trainer.torch.CommandApplier` applies the server's commands (``decay``, ``set_lr``, ``stop``) to the
optimizer and the LR scheduler; a ``stop`` ends training at that step and the run is marked ``finished``.

This module imports torch only inside :func:`main`, so the ``stagewatch`` command can list it without torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2
RECIPES = ("mnist1d-cnn",)
SCHEDULES = ("constant", "step")
DEFAULT_SERVER = "http://127.0.0.1:8765"


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
        help="constant LR, or step: x0.1 at 50%% and 75%% of the epochs (default: constant)",
    )
    parser.add_argument("--epochs", type=_positive_int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and minibatch order")
    parser.add_argument("--batch-size", type=_non_negative_int, default=32, help="0 = full batch")
    parser.add_argument("--lr", type=_positive_float, default=0.1)
    parser.add_argument(
        "--num-samples", type=_positive_int, default=None, help="MNIST-1D samples, train + test (default 5000)"
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
    parser.add_argument("--name", default=None, help="run name (default: the recipe and schedule)")
    return parser


def step_milestones(epochs: int) -> list[int]:
    """The 0-based epochs at which the ``step`` schedule decays: 50% and 75% of the way through."""
    return [epochs // 2, (3 * epochs) // 4]


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recipe not in RECIPES:
        sys.stderr.write(f"stagewatch train: unknown recipe {args.recipe!r}; known recipes: {', '.join(RECIPES)}\n")
        return EXIT_USAGE
    if args.num_samples is not None and args.num_samples < 20:
        sys.stderr.write(f"stagewatch train: --num-samples must be at least 20, got {args.num_samples}\n")
        return EXIT_USAGE
    return _train_mnist1d(args)


def _train_mnist1d(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from torch.optim.lr_scheduler import LambdaLR

    from trainer.recipes.mnist1d import ConvNet, TrainConfig, evaluate, load_data, step_decay
    from trainer.run import start_run
    from trainer.torch import CommandApplier

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    data = load_data(num_samples=args.num_samples)
    n = data.num_train
    batch_size = n if config.batch_size == 0 else min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    milestones = step_milestones(config.epochs) if args.schedule == "step" else []
    factor = step_decay(1.0, milestones)  # factor(epoch, step): the schedule relative to --lr

    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    model = ConvNet(config.channels)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    # The scheduler counts updates; update k+1 belongs to epoch k // steps_per_epoch. A decay command scales
    # its base LR (CommandApplier patches it), so the schedule goes on from the server's new rate.
    scheduler = LambdaLR(optimizer, lambda done: factor(done // steps_per_epoch, done + 1))
    batches = torch.Generator().manual_seed(config.seed)
    run_config: dict[str, Any] = {
        "recipe": args.recipe,
        "schedule": args.schedule,
        "milestones": milestones,
        "lr": args.lr,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
        "num_train": n,
    }
    name = args.name or f"{args.recipe} {args.schedule} lr={args.lr:g}"

    with start_run(args.server, name=name, config=run_config, token=args.token, tags=[args.recipe]) as run:
        plan = f"{name}, {config.epochs} epochs, {steps_per_epoch} steps/epoch"
        _out(f"stagewatch train: run {run.id} ({plan}) on {args.server}")
        applier = CommandApplier(run, optimizer, scheduler)
        step = 0
        completed = 0
        test_loss = test_acc = math.nan
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=batches) if batch_size < n else torch.arange(n)
            loss_sum = 0.0
            for first in range(0, n, batch_size):
                index = order[first : first + batch_size]
                lr = applier.current_lr()
                loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_value = loss.item()
                loss_sum += loss_value * len(index)
                run.log({"train/loss": loss_value, "lr": lr}, step=step, epoch=step / steps_per_epoch)
                applier.step(step)
                if applier.should_stop:
                    break
            if applier.should_stop:
                _out(f"stagewatch train: run {run.id} stopped by the server at step {step} (epoch {epoch + 1})")
                break
            completed = epoch + 1
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            train_loss = loss_sum / n
            run.log(
                {"epoch/train_loss": train_loss, "test/loss": test_loss, "test/accuracy": test_acc},
                step=step,
                epoch=float(completed),
            )
            _out(
                f"epoch {completed}/{config.epochs}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
                f"test accuracy {test_acc:.3f}  lr {applier.current_lr():.3g}"
            )
    _out(
        f"stagewatch train: run {run.id} {'stopped' if applier.should_stop else 'finished'}: {completed} epochs, "
        f"{step} steps, test loss {test_loss:.4f}, test accuracy {test_acc:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
