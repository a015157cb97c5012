"""Claim (d): how well a checkpoint's features carry over to a shifted MNIST-1D task.

The paper transfers ImageNet models to *other* datasets (new classes, the same kind of images). MNIST-1D's
generator can make such a task: :func:`mnist1d.data.make_dataset` accepts its own templates, so the targets
here keep the generator (padding, scaling, translation, correlated and i.i.d. noise, shear) and change what is
to be recognised:

* ``reversed`` (the primary target, fixed before any result was seen): the ten templates played backwards.
  The pieces (slopes, bumps, lengths) are those the source network learned to see, the shapes to tell apart
  are new, and labels mean something else -- the analogue of ImageNet features applied to Caltech-256 or
  MIT Indoor-67.
* ``harder``: the source's ten classes under stronger nuisances (twice the correlated noise, 1.5x the shear,
  twice the scale range) -- a domain shift with the same labels; a second, secondary reading.

Both draw 2,000 samples with their own seed (half for training, half held out), so a target has 1,000 training
samples: few enough that what the checkpoint brings matters. Each checkpoint is evaluated two ways:

* **linear probe**: the frozen network up to its last convolution (the head's input, ``channels x 10``
  features), standardised with the target's training statistics (checkpoints of different stages have features
  of different scales; standardising keeps one L2 penalty comparable), multinomial logistic regression fitted
  by full-batch L-BFGS (L2 ``PROBE_L2``, ``PROBE_ITERATIONS`` iterations): deterministic;
* **fine-tuning**: the whole network with a fresh head, SGD (LR ``FT_LR``, momentum 0.9, weight decay 5e-4,
  batch 32) for ``FT_EPOCHS`` epochs, minibatch order and head initialisation seeded -- short on purpose: a long
  fine-tuning would wash out where it started from.

Both report the held-out target accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, get_templates, make_dataset
from torch import nn

from trainer.recipes.mnist1d import NUM_CLASSES, ConvNet

TARGETS = ("reversed", "harder")
PRIMARY_TARGET = "reversed"
TARGET_SAMPLES = 2000  # per target: half to train the probe / fine-tune, half held out
TARGET_SEED = 2024  # the targets' own data seed (the source's is mnist1d's default, 42)
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 100
FT_LR = 0.01
FT_EPOCHS = 5
FT_BATCH = 32


@cache
def target_data(name: str, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of target ``name`` (see the module doc), inputs ``(n, 1, 40)``."""
    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = 0.5
    args.seed = TARGET_SEED
    templates = get_templates()
    if name == "reversed":
        templates = {**templates, "x": [np.ascontiguousarray(np.asarray(x)[::-1]) for x in templates["x"]]}
    elif name == "harder":
        args.corr_noise_scale *= 2.0
        args.shear_scale *= 1.5
        args.scale_coeff *= 2.0
    else:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    raw = make_dataset(args, template=templates)
    return (
        torch.as_tensor(raw["x"], dtype=torch.float32).unsqueeze(1),
        torch.as_tensor(raw["y"], dtype=torch.int64),
        torch.as_tensor(raw["x_test"], dtype=torch.float32).unsqueeze(1),
        torch.as_tensor(raw["y_test"], dtype=torch.int64),
    )


def _model(state: dict[str, torch.Tensor]) -> ConvNet:
    channels = int(state["conv1.weight"].shape[0])
    model = ConvNet(channels)
    model.load_state_dict(state)
    return model


def features(model: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """The head's input: the three convolutions with their ReLUs, flattened."""
    model.eval()
    with torch.no_grad():
        h = F.relu(model.conv1(x))
        h = F.relu(model.conv2(h))
        h = F.relu(model.conv3(h))
        return h.flatten(1)


def linear_probe(state: dict[str, torch.Tensor], target: str, num_samples: int) -> float:
    """Held-out accuracy of a logistic regression on the frozen, standardised features (module doc)."""
    x_train, y_train, x_test, y_test = target_data(target, num_samples)
    model = _model(state)
    f_train, f_test = features(model, x_train), features(model, x_test)
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)  # a dead unit stays 0, not NaN
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    linear = nn.Linear(f_train.shape[1], NUM_CLASSES)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(f_train), y_train) + PROBE_L2 * linear.weight.pow(2).sum()
        torch.autograd.backward(loss)
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]  # LBFGS.step has no annotations in torch
    with torch.no_grad():
        return float((linear(f_test).argmax(1) == y_test).float().mean())


def fine_tune(state: dict[str, torch.Tensor], target: str, num_samples: int, seed: int) -> float:
    """Held-out accuracy after a short fine-tuning of the whole network with a fresh head (module doc)."""
    x_train, y_train, x_test, y_test = target_data(target, num_samples)
    model = _model(state)
    torch.manual_seed(10_000 + seed)
    model.head.reset_parameters()  # new task, new labels: the source head means nothing there
    optimizer = torch.optim.SGD(model.parameters(), lr=FT_LR, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(20_000 + seed)
    n = len(y_train)
    model.train()
    for _ in range(FT_EPOCHS):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, FT_BATCH):
            index = order[first : first + FT_BATCH]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


EVALUATIONS: dict[str, Callable[[dict[str, torch.Tensor], str, int, int], float]] = {
    "probe": lambda state, target, n, seed: linear_probe(state, target, n),
    "finetune": fine_tune,
}


def evaluate_checkpoint(state: dict[str, torch.Tensor], *, seed: int, num_samples: int) -> dict[str, Any]:
    """``{"<target>/<probe|finetune>": accuracy}`` for every target and evaluation."""
    torch.set_num_threads(1)
    return {
        f"{target}/{how}": evaluate(state, target, num_samples, seed)
        for target in TARGETS
        for how, evaluate in EVALUATIONS.items()
    }
