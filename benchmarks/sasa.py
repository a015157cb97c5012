"""SASA+'s stationarity statistic of every SGD update, recorded through the optimizer's step hooks.

``record_curves`` writes it next to the loss (``sasa_delta``) for the ``stationarity`` detector. The
statistic is ``<x_{k+1}, d_k> + (lr/2)·||d_k||²`` summed over all parameters, where ``x_{k+1}`` are the
parameters after the update and ``d_k`` its direction including weight decay: for PyTorch SGD with momentum
and no dampening, the momentum buffer after the step (``x_{k+1} = x_k - lr·d_k``). Its mean is zero once SGD
is stationary. (For the same trajectory, statopt's dampened-momentum form is ``1 - momentum`` times this.)

It hooks the optimizer rather than the training loop so that the curves are recorded by the loop
``stagewatch train`` runs (:func:`trainer.loop.fit`), which knows nothing about this research statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SasaDelta"]


class SasaDelta:
    """Attached to a one-group ``torch.optim.SGD`` (no dampening, no Nesterov); after each ``optimizer.step()``,
    :attr:`value` is the statistic of that update (NaN before the first one, or when it is not finite)."""

    def __init__(self, optimizer: torch.optim.SGD) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"SasaDelta needs one param group, got {len(optimizer.param_groups)}")
        group = optimizer.param_groups[0]
        if group["dampening"] != 0 or group["nesterov"]:
            raise ValueError("SasaDelta's direction is the momentum buffer of SGD without dampening or Nesterov")
        self._optimizer = optimizer
        self._group = group
        self._params: list[torch.Tensor] = [p for p in group["params"] if p.requires_grad]
        self._direction: list[torch.Tensor] | None = None
        self.value = math.nan
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Without momentum PyTorch keeps no buffer: take the direction before the step changes the weights.
        if self._group["momentum"] == 0:
            weight_decay = self._group["weight_decay"]
            self._direction = [
                ((torch.zeros_like(p) if p.grad is None else p.grad) + weight_decay * p).detach().clone()
                for p in self._params
            ]

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        direction = self._direction
        if direction is None:
            state = self._optimizer.state
            direction = [state[p]["momentum_buffer"] for p in self._params]
        self._direction = None
        # The group's rate is still the update's: fit steps its scheduler after the optimizer.
        self.value = _statistic(self._params, direction, float(self._group["lr"]))


def _statistic(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], lr: float) -> float:
    """``<x, d> + (lr/2)·||d||²`` over all parameters, accumulated in float64."""
    with torch.no_grad():
        inner = 0.0
        square = 0.0
        for p, d in zip(params, direction, strict=True):
            p64, d64 = p.detach().double().flatten(), d.double().flatten()
            inner += float(torch.dot(p64, d64))
            square += float(torch.dot(d64, d64))
    value = inner + 0.5 * lr * square
    return value if math.isfinite(value) else math.nan
