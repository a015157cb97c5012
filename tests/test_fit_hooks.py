"""``trainer.loop.fit``'s ``on_step``/``on_epoch`` hooks and the SASA+ statistic recorded through SGD's step hooks:
what ``benchmarks.record_curves`` and ``benchmarks.bench_train_overhead`` measure through the one training loop."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from benchmarks.offline_run import OfflineRun
from benchmarks.sasa import SasaDelta
from trainer.loop import EpochStats, StepStats, fit
from trainer.recipes.mnist1d import load_data, make_task

EPOCHS = 4
BATCH_SIZE = 50


class RecordingRun(OfflineRun):
    """An offline run that keeps what ``fit`` logs, to compare with what the hooks saw."""

    def __init__(self) -> None:
        self.logged: dict[str, list[tuple[int, float]]] = {}

    def log(self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False) -> None:
        for key, value in values.items():
            self.logged.setdefault(key, []).append((step, float(value)))


def test_hooks_see_what_the_run_gets() -> None:
    data = load_data(num_samples=600)
    task = make_task(data, batch_size=BATCH_SIZE, seed=0)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    run = RecordingRun()
    steps: list[StepStats] = []
    epochs: list[EpochStats] = []
    result = fit(
        task, run, schedule="step", epochs=EPOCHS, optimizer=optimizer, on_step=steps.append, on_epoch=epochs.append
    )

    assert result.steps == len(steps) == EPOCHS * task.steps_per_epoch
    assert [s.step for s in steps] == list(range(1, result.steps + 1))
    assert [s.epoch for s in steps] == [i // task.steps_per_epoch for i in range(result.steps)]
    assert [(s.step, s.loss) for s in steps] == run.logged["train/loss"]
    assert [(s.step, s.lr) for s in steps] == run.logged["lr"]
    # The step schedule decays x0.1 at 50% and 75% of the epochs: epochs 2 and 3 of 4.
    assert [steps[e * task.steps_per_epoch].lr for e in range(EPOCHS)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert all(s.outputs.shape == (len(s.labels), 10) for s in steps)

    assert [e.epoch for e in epochs] == list(range(1, EPOCHS + 1))
    assert [(e.step, e.train_loss) for e in epochs] == run.logged["epoch/train_loss"]
    assert [(e.step, e.test_accuracy) for e in epochs] == run.logged["test/accuracy"]
    assert [e.lr for e in epochs] == [steps[e.step - 1].lr for e in epochs]  # the rate of the epoch's last update
    assert all(e.seconds > 0 for e in epochs)
    assert epochs[-1].test_loss == result.test_loss


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sasa_delta_is_the_statistic_of_each_update(momentum: float) -> None:
    """``<x_{k+1}, d_k> + (lr/2)·||d_k||²`` with ``d_k = (x_k - x_{k+1}) / lr``, from the weights alone."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    lr, weight_decay = 0.05, 1e-2
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sasa = SasaDelta(optimizer)
    assert math.isnan(sasa.value)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(3):
        before = [p.detach().double().clone() for p in model.parameters()]
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        after = [p.detach().double() for p in model.parameters()]
        direction = [(b - a) / lr for b, a in zip(before, after, strict=True)]
        expected = sum(
            float((a * d).sum()) + 0.5 * lr * float((d * d).sum()) for a, d in zip(after, direction, strict=True)
        )
        assert sasa.value == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_sasa_delta_refuses_what_its_direction_does_not_cover() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Nesterov"):
        SasaDelta(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
